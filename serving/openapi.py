"""The server's OpenAPI document, built from the pydantic request models (served at GET /openapi.json)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
            "required": ["message", "type", "code"],
        }
    },
    "required": ["error"],
}
_ERRORS = {
    "400": "invalid request",
    "401": "missing or wrong API key (the admin key on operator routes)",
    "404": "unknown model",
    "413": "request body too large",
    "500": "the engine failed this request",
    "503": "the engine is not running",
}


def _responses(ok: str) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    out: dict[str, Any] = {"200": {"description": ok}}
    for code, text in _ERRORS.items():
        out[code] = {"description": text, "content": error}
    return out


def _post(model: type[BaseModel], summary: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": _responses(summary),
        }
    }


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": _responses(summary)}}


def _get_model() -> dict[str, Any]:
    route = _get("one model by name (OpenAI's retrieve-model)")
    route["get"]["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    return route


def openapi_document(title: str = "loong-jax", version: str = "0.1.0") -> dict[str, Any]:
    """OpenAPI 3.1 description of every route, request bodies from the models the server validates with."""
    schemas: dict[str, Any] = {"Error": _ERROR}
    for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "OpenAI-compatible API of loong-jax"},
        "paths": {
            "/v1/completions": _post(CompletionRequest, "text completion"),
            "/v1/chat/completions": _post(ChatCompletionRequest, "chat completion"),
            "/tokenize": _post(TokenizeRequest, "token ids of a prompt or conversation"),
            "/detokenize": _post(DetokenizeRequest, "text of token ids"),
            "/v1/models": _get("the served model"),
            "/v1/models/{model}": _get_model(),
            "/server_info": _get("operator details: instances, cache isolation, KV cache sizing"),
            "/health": _get("whether the engine runs"),
        },
        "components": {"schemas": schemas},
    }
