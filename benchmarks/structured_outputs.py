"""Structured outputs with SmolLM2-135M on CPU: validity, compile time, per-token cost and TTFT beside compiles.

1. 22 JSON schemas of increasing difficulty (nested objects, bounded arrays, enums, anyOf, nullable fields,
   string patterns, lengths and formats, numeric bounds, required and optional properties), each sampled at
   temperature 0.7 with several seeds: every finished output must validate (`jsonschema`), and the share that
   finishes within 400 tokens is reported; the grammar compile time of each schema (a fresh compiler).
2. Per-token cost of constrained against unconstrained decoding at batch 1 and 16, same run, same token
   counts (a JSON array cut by max_tokens against free text with ignore_eos); and unconstrained in single
   steps, to tell the share of the cost that single steps take from the share of the mask.
3. Time to first token of unconstrained streams on a real server (loopback HTTP) alone and while other
   clients send requests with new schemas to compile.

Run: `python benchmarks/structured_outputs.py` (writes benchmarks/results/structured_outputs.json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import statistics
import threading
import time

from loong_jax.model.sampling import closed_schema

S = {"type": "string", "maxLength": 40}
SCHEMAS = [
    ("one string", {"type": "object", "properties": {"answer": S}, "required": ["answer"]}),
    ("boolean", {"type": "object", "properties": {"is_capital": {"type": "boolean"}}, "required": ["is_capital"]}),
    (
        "bounded integer",
        {
            "type": "object",
            "properties": {"year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
            "required": ["year"],
        },
    ),
    (
        "bounded number",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -90, "maximum": 60}},
            "required": ["celsius"],
        },
    ),
    (
        "enum",
        {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "angry", "calm"]}}, "required": ["mood"]},
    ),
    (
        "string length",
        {
            "type": "object",
            "properties": {"title": {"type": "string", "minLength": 5, "maxLength": 20}},
            "required": ["title"],
        },
    ),
    (
        "string pattern",
        {
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
            "required": ["code"],
        },
    ),
    (
        "nullable",
        {
            "type": "object",
            "properties": {"name": S, "nickname": {"type": ["string", "null"], "maxLength": 20}},
            "required": ["name", "nickname"],
        },
    ),
    (
        "optional properties",
        {"type": "object", "properties": {"name": S, "email": S, "phone": S}, "required": ["name"]},
    ),
    (
        "bounded string array",
        {
            "type": "object",
            "properties": {
                "colors": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3}
            },
            "required": ["colors"],
        },
    ),
    (
        "bounded integer array",
        {
            "type": "object",
            "properties": {
                "scores": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 100},
                    "minItems": 2,
                    "maxItems": 5,
                }
            },
            "required": ["scores"],
        },
    ),
    (
        "nested object",
        {
            "type": "object",
            "properties": {
                "city": S,
                "location": {
                    "type": "object",
                    "properties": {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    },
                    "required": ["lat", "lon"],
                },
            },
            "required": ["city", "location"],
        },
    ),
    (
        "array of objects",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {"name": S, "price": {"type": "number", "minimum": 0, "maximum": 1000}},
                        "required": ["name", "price"],
                    },
                }
            },
            "required": ["items"],
        },
    ),
    (
        "anyOf scalar",
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "maxLength": 10}]
                }
            },
            "required": ["value"],
        },
    ),
    (
        "anyOf objects",
        {
            "type": "object",
            "properties": {
                "shape": {
                    "anyOf": [
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "circle"},
                                "radius": {"type": "number", "minimum": 0, "maximum": 100},
                            },
                            "required": ["kind", "radius"],
                        },
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "square"},
                                "side": {"type": "number", "minimum": 0, "maximum": 100},
                            },
                            "required": ["kind", "side"],
                        },
                    ]
                }
            },
            "required": ["shape"],
        },
    ),
    (
        "date format",
        {
            "type": "object",
            "properties": {"event": S, "date": {"type": "string", "format": "date"}},
            "required": ["event", "date"],
        },
    ),
    (
        "email format",
        {
            "type": "object",
            "properties": {"name": S, "email": {"type": "string", "format": "email"}},
            "required": ["name", "email"],
        },
    ),
    (
        "const",
        {
            "type": "object",
            "properties": {"version": {"const": 2}, "status": {"enum": ["ok", "error"]}},
            "required": ["version", "status"],
        },
    ),
    (
        "three levels",
        {
            "type": "object",
            "properties": {
                "company": {
                    "type": "object",
                    "properties": {
                        "name": S,
                        "ceo": {
                            "type": "object",
                            "properties": {"name": S, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                            "required": ["name", "age"],
                        },
                    },
                    "required": ["name", "ceo"],
                }
            },
            "required": ["company"],
        },
    ),
    (
        "person",
        {
            "type": "object",
            "properties": {
                "name": S,
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {
                    "type": "object",
                    "properties": {"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"],
                },
                "tags": {"type": "array", "items": {"enum": ["friend", "work", "family"]}, "maxItems": 3},
                "phone": {"type": ["string", "null"], "maxLength": 20},
            },
            "required": ["name", "age", "address", "tags", "phone"],
        },
    ),
    (
        "orders",
        {
            "type": "object",
            "properties": {
                "orders": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                            "lines": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 2,
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                        "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                                    },
                                    "required": ["sku", "qty"],
                                },
                            },
                            "note": {"type": ["string", "null"], "maxLength": 30},
                        },
                        "required": ["id", "lines", "note"],
                    },
                }
            },
            "required": ["orders"],
        },
    ),
    (
        "bounds galore",
        {
            "type": "object",
            "properties": {
                "label": {"type": "string", "minLength": 3, "maxLength": 12},
                "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "count": {"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 5},
                "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
            },
            "required": ["label", "ratio", "count", "flags"],
        },
    ),
]


def prompt_for(name: str, schema: dict) -> list[dict]:
    ask = f"Reply with a JSON object ({name}) that follows this JSON schema:\n{json.dumps(schema)}"
    return [{"role": "user", "content": ask}]


def validity(llm, seeds: int, max_tokens: int) -> dict:
    import jsonschema

    from loong_jax import SamplingParams, StructuredOutput
    from loong_jax.structured import GrammarCompiler

    engine = llm.engine
    compile_ms = {}
    for name, schema in SCHEMAS:  # a fresh compiler per schema: its cold compile time (tokenizer built first)
        fresh = GrammarCompiler(llm.tokenizer, engine.cfg.vocab_size, engine.eos_ids)
        fresh.check(StructuredOutput(json_object=True))
        t0 = time.perf_counter()
        fresh.check(StructuredOutput(json_schema=closed_schema(schema)))
        compile_ms[name] = (time.perf_counter() - t0) * 1000
    prompts, params, names = [], [], []
    for name, schema in SCHEMAS:
        for seed in range(seeds):
            so = StructuredOutput(json_schema=closed_schema(schema))
            prompts.append(llm.chat_prompt_ids(prompt_for(name, schema)))
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed, structured_output=so))
            names.append(name)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    rows, invalid = [], []
    for name, out in zip(names, outs):
        schema = closed_schema(dict(SCHEMAS)[name])
        ok = None
        if out.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(out.text), schema)
                ok = True
            except (ValueError, jsonschema.ValidationError) as e:
                ok = False
                invalid.append({"schema": name, "text": out.text, "error": str(e)[:200]})
        rows.append({"schema": name, "finish": out.finish_reason, "tokens": len(out.token_ids), "valid": ok})
    finished = [r for r in rows if r["finish"] == "stop"]
    return {
        "schemas": len(SCHEMAS),
        "outputs": len(rows),
        "finished_within_max_tokens": len(finished) / len(rows),
        "finished_valid": sum(bool(r["valid"]) for r in finished) / max(1, len(finished)),
        "invalid": invalid,
        "compile_ms": compile_ms,
        "compile_ms_median": statistics.median(compile_ms.values()),
        "compile_ms_max": max(compile_ms.values()),
        "tokens_mean": statistics.mean(r["tokens"] for r in rows),
        "generate_s": seconds,
        "rows": rows,
    }


def per_token(llm, batch: int, tokens: int, repeats: int) -> dict:
    """Seconds per generated token of a batch: constrained (a JSON array cut by max_tokens), unconstrained
    (ignore_eos) with the engine's bursts, and unconstrained in single steps."""
    from loong_jax import SamplingParams, StructuredOutput

    ask = llm.chat_prompt_ids([{"role": "user", "content": "List numbers as a JSON array, one after another."}])
    array = StructuredOutput(
        json_schema={"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 10_000}
    )
    kinds = {
        "unconstrained": SamplingParams(max_tokens=tokens, temperature=0.7, ignore_eos=True),
        "constrained": SamplingParams(max_tokens=tokens, temperature=0.7, structured_output=array),
    }
    engine = llm.engine
    out = {}
    for kind, base in [*kinds.items(), ("unconstrained, single steps", kinds["unconstrained"])]:
        ecfg = engine.ecfg
        if kind.endswith("single steps"):
            engine.ecfg = dataclasses.replace(ecfg, decode_steps=1)
        try:
            llm.generate([ask] * batch, [base] * batch)  # warm
            times = []
            for r in range(repeats):
                params = [SamplingParams(**{**vars(base), "seed": r * batch + i}) for i in range(batch)]
                t0 = time.perf_counter()
                res = llm.generate([ask] * batch, params)
                times.append((time.perf_counter() - t0) / sum(len(o.token_ids) for o in res) * batch)
                assert all(len(o.token_ids) == tokens for o in res), [o.finish_reason for o in res]
        finally:
            engine.ecfg = ecfg
        out[kind] = statistics.median(times)
    out["constrained_over_unconstrained"] = out["constrained"] / out["unconstrained"]
    out["single_steps_over_bursts"] = out["unconstrained, single steps"] / out["unconstrained"]
    return out


def ttft_beside_compiles(llm, streams: int) -> dict:
    """Median time to first token of unconstrained streams on a real server: alone; while two other clients
    send constrained requests whose schema is compiled already (the same load, no compiling); and while they
    send requests with new schemas (each distinct, so each compiles). The last two differ only by compiling."""
    import httpx

    from serving.app import build_app
    from serving.server import build_server, start_in_thread

    srv, engine = build_server(llm, "smollm2")
    url, uv = start_in_thread(build_app(srv, on_shutdown=lambda: engine.shutdown(10)))
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True}

    def ttft() -> float:
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    return time.perf_counter() - t0
        return time.perf_counter() - t0

    def schema(k: int) -> dict:  # eleven string fields with patterns: a few milliseconds to compile
        fields = {
            f"field_{k}_{i}": {"type": "string", "pattern": f"^[a-z]{{{i}}}[0-9]{{{k % 7 + 1}}}$"} for i in range(1, 12)
        }
        return closed_schema({"type": "object", "properties": fields, "required": [f"field_{k}_1"]})

    def load(stop: threading.Event, fresh: bool, sent: list) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema(k if fresh else 0)}}
            messages = [{"role": "user", "content": "JSON"}]
            payload = {"model": "smollm2", "messages": messages, "max_tokens": 1, "response_format": fmt}
            sent.append(httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=120).status_code == 200)

    def beside(fresh: bool) -> tuple[list[float], int]:
        stop, sent = threading.Event(), []
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(load, stop, fresh, sent) for _ in range(2)]
            time.sleep(0.5)
            times = [ttft() for _ in range(streams)]
            stop.set()
            for f in loads:
                f.result()
        return times, sum(sent)

    try:
        for _ in range(2):
            ttft()  # warm
        alone = [ttft() for _ in range(streams)]
        cached, n_cached = beside(fresh=False)
        compiling, n_compiled = beside(fresh=True)
    finally:
        uv.should_exit = True
    med = statistics.median
    return {
        "ttft_alone_s": med(alone),
        "ttft_beside_cached_schemas_s": med(cached),
        "ttft_beside_compiles_s": med(compiling),
        "compiles_over_cached": med(compiling) / med(cached),
        "requests_with_cached_schemas_meanwhile": n_cached,
        "schemas_compiled_meanwhile": n_compiled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request in the per-token comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--parts", nargs="+", default=["validity", "per_token", "ttft"], help="what to measure")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "structured_outputs.json"))
    args = ap.parse_args()

    from loong_jax import LLM

    llm = LLM(num_instances=1, kv_tokens_per_instance=32768, max_model_len=2048, max_num_seqs=64, seed=0)
    result = {"date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct", "machine": os.uname().nodename}
    if "validity" in args.parts:
        v = result["validity"] = validity(llm, args.seeds, args.max_tokens)
        print(
            f"{v['outputs']} outputs of {v['schemas']} schemas: {v['finished_within_max_tokens']:.0%} finished "
            f"within {args.max_tokens} tokens, {v['finished_valid']:.0%} of those valid ({len(v['invalid'])} "
            f"invalid); compile median {v['compile_ms_median']:.1f} ms, max {v['compile_ms_max']:.1f} ms"
        )
    if "per_token" in args.parts:
        result["per_token"] = {}
        for b in args.batches:
            p = result["per_token"][str(b)] = per_token(llm, b, args.tokens, args.repeats)
            print(
                f"batch {b}: {p['constrained'] * 1000:.1f} ms a token constrained, {p['unconstrained'] * 1000:.1f} "
                f"unconstrained ({p['constrained_over_unconstrained']:.2f}x); single steps "
                f"{p['single_steps_over_bursts']:.2f}x the bursts"
            )
    if "ttft" in args.parts:
        t = result["ttft"] = ttft_beside_compiles(llm, args.streams)
        print(
            f"TTFT of unconstrained streams: {t['ttft_alone_s'] * 1000:.0f} ms alone, "
            f"{t['ttft_beside_cached_schemas_s'] * 1000:.0f} ms beside constrained requests with a compiled schema, "
            f"{t['ttft_beside_compiles_s'] * 1000:.0f} ms beside {t['schemas_compiled_meanwhile']} new schemas "
            f"compiling ({t['compiles_over_cached']:.2f}x the same load without compiling)"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
