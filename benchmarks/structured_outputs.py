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
        steps = engine.ecfg.decode_steps
        if kind.endswith("single steps"):
            engine.ecfg.decode_steps = 1
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
            engine.ecfg.decode_steps = steps
        out[kind] = statistics.median(times)
    out["constrained_over_unconstrained"] = out["constrained"] / out["unconstrained"]
    out["single_steps_over_bursts"] = out["unconstrained, single steps"] / out["unconstrained"]
    return out


def ttft_beside_compiles(llm, streams: int) -> dict:
    """Median time to first token of unconstrained streams, alone and while other clients send requests with
    new schemas (each distinct, so each compiles)."""
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

    stop = threading.Event()
    compiled = [0]

    def compile_load() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            schema = closed_schema(
                {
                    "type": "object",
                    "properties": {
                        f"field_{k}_{i}": {"type": "string", "pattern": f"^[a-z]{{{i}}}[0-9]{{{k % 7 + 1}}}$"}
                        for i in range(1, 12)
                    },
                    "required": [f"field_{k}_1"],
                }
            )
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema}}
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "JSON"}],
                    "max_tokens": 1,
                    "response_format": fmt,
                },
                timeout=120,
            )
            compiled[0] += r.status_code == 200

    try:
        for _ in range(2):
            ttft()  # warm
        alone = [ttft() for _ in range(streams)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(compile_load) for _ in range(2)]
            time.sleep(0.5)
            beside = [ttft() for _ in range(streams)]
            stop.set()
            for f in loads:
                f.result()
    finally:
        uv.should_exit = True
    return {
        "ttft_alone_s": statistics.median(alone),
        "ttft_beside_compiles_s": statistics.median(beside),
        "ratio": statistics.median(beside) / statistics.median(alone),
        "schemas_compiled_meanwhile": compiled[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request in the per-token comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "structured_outputs.json"))
    args = ap.parse_args()

    from loong_jax import LLM

    llm = LLM(num_instances=1, kv_tokens_per_instance=32768, max_model_len=2048, max_num_seqs=64, seed=0)
    result = {"date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct", "machine": os.uname().nodename}
    v = validity(llm, args.seeds, args.max_tokens)
    result["validity"] = v
    print(
        f"{v['outputs']} outputs of {v['schemas']} schemas: {v['finished_within_max_tokens']:.0%} finished within "
        f"{args.max_tokens} tokens, {v['finished_valid']:.0%} of those valid ({len(v['invalid'])} invalid); compile "
        f"median {v['compile_ms_median']:.1f} ms, max {v['compile_ms_max']:.1f} ms"
    )
    result["per_token"] = {}
    for b in args.batches:
        p = per_token(llm, b, args.tokens, args.repeats)
        result["per_token"][str(b)] = p
        print(
            f"batch {b}: {p['constrained'] * 1000:.1f} ms a token constrained, {p['unconstrained'] * 1000:.1f} "
            f"unconstrained ({p['constrained_over_unconstrained']:.2f}x); single steps "
            f"{p['single_steps_over_bursts']:.2f}x the bursts"
        )
    t = ttft_beside_compiles(llm, args.streams)
    result["ttft"] = t
    print(
        f"TTFT of unconstrained streams: {t['ttft_alone_s'] * 1000:.0f} ms alone, "
        f"{t['ttft_beside_compiles_s'] * 1000:.0f} ms while {t['schemas_compiled_meanwhile']} new schemas "
        f"compiled ({t['ratio']:.2f}x)"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
