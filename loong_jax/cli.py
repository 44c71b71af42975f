"""The `loong` command line: generate, chat, serve, profile and convert."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from loong_jax.multihost import Distributed, initialize, shutdown
from loong_jax.runtime.platform import use_virtual_cpu_devices


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face dir or Orbax dir (default: SmolLM2)")
    p.add_argument("--num-instances", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument(
        "--kv-tokens-per-instance",
        type=int,
        default=None,
        help="KV cache tokens per instance (default: as many as --memory-utilization leaves room for)",
    )
    p.add_argument(
        "--memory-utilization",
        type=float,
        default=None,
        help="fraction of the memory the engine may fill, KV cache included (default: 0.9 of each accelerator's "
        "memory; on CPU 0.5 of the host's available memory)",
    )
    p.add_argument(
        "--policy",
        choices=["elastic", "shared"],
        default="elastic",
        help="elastic: the cost-model scheduler (default); shared: one program at a time, for instances that "
        "share one processor (virtual CPU devices), usually faster there",
    )
    p.add_argument(
        "--attention-backend",
        choices=["auto", "xla", "pallas"],
        default="auto",
        help="auto: the Pallas kernels on GPU, XLA elsewhere (default); pallas on CPU runs them in interpret "
        "mode (slow)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="most decode steps per launch: a burst on the device, its tokens fed back there; the host reads, "
        "streams and schedules once per burst and dispatches the next before reading the last; single steps while "
        "a prompt that could start waits (default: 8)",
    )
    p.add_argument(
        "--max-batch-requests",
        type=int,
        default=None,
        help="requests one scheduling decision admits (default: as many as one prefill pass per instance takes)",
    )
    p.add_argument(
        "--unroll-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the layers one after another, each matmul reading its weights in place (default on accelerators); "
        "--no-unroll-layers: a loop over stacked weights that copies each layer's weights every step but compiles "
        "2-3x faster (default on CPU, where unrolling makes decode about 1.6x faster)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not reuse the KV of earlier requests' prompt prefixes (on by default: exact, evicted when room "
        "is needed)",
    )
    p.add_argument(
        "--host-kv-cache-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="host memory for prefix pages evicted from the KV pools, loaded back on a hit (default: a quarter of "
        "the host memory left after the process and the pools; 0: none)",
    )


def _multihost_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-host",
        "one row of instances over several processes (one per host): run the same command on every host with "
        "its own --process-id; process 0 serves HTTP. --num-instances counts the instances of all hosts, split "
        "evenly. Or set LOONG_COORDINATOR, LOONG_NUM_PROCESSES and LOONG_PROCESS_ID.",
    )
    g.add_argument("--coordinator", default=None, help="HOST:PORT where process 0 coordinates the run")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument(
        "--heartbeat-timeout", type=float, default=30.0, help="seconds without a heartbeat before a process is lost"
    )
    g.add_argument("--step-timeout", type=float, default=300.0, help="seconds a process may take to answer one launch")


def distributed_settings(args: argparse.Namespace) -> Distributed | None:
    """The multi-host settings of `serve` (all three options, or the environment), checked; None if none."""
    given = [getattr(args, name, None) for name in ("coordinator", "num_processes", "process_id")]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("a multi-host run needs all of --coordinator, --num-processes and --process-id")
    dist = Distributed.from_env() if given[0] is None else Distributed(*given)
    devices = args.num_instances * args.tp
    if dist is not None and devices % dist.num_processes:
        raise ValueError(
            f"--num-instances x --tp ({devices}) must split evenly over the {dist.num_processes} processes"
        )
    return dist


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong", description="loong-jax: long-context LLM serving on JAX")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt (raw text, no chat template)")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="answer a user message with the model's chat template")
    chat.add_argument("message")
    chat.add_argument("--system", default=None, help="optional system message")
    for p in (gen, chat):
        _model_args(p)
        _sampling_args(p)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _model_args(srv)
    _multihost_args(srv)
    from serving.server import add_serve_args  # noqa: PLC0415

    add_serve_args(srv)
    prof = sub.add_parser("profile", help="fit the scheduler's cost model on this machine and save it")
    _model_args(prof)
    prof.add_argument("--max-num-seqs", type=int, default=16)
    prof.add_argument("--max-prefill-tokens", type=int, default=2048)
    prof.add_argument("--repeats", type=int, default=2, help="timed runs per shape (after one warm run)")
    prof.add_argument("--output", default=None, help="file to write (default: the per-model-and-hardware cache)")
    conv = sub.add_parser("convert", help="convert a checkpoint to an Orbax checkpoint (fast reloads)")
    conv.add_argument("source", help="GGUF file or Hugging Face directory ('default' for SmolLM2)")
    conv.add_argument("output", help="new directory to write")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return parser


def load_llm(args: argparse.Namespace, **limits: int):
    """The LLM that the model options of `generate`, `chat` and `serve` describe."""
    from loong_jax import LLM  # noqa: PLC0415

    return LLM(
        args.model,
        num_instances=args.num_instances,
        tp=args.tp,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        kv_tokens_per_instance=args.kv_tokens_per_instance,
        memory_utilization=args.memory_utilization,
        policy=args.policy,
        attention_backend=args.attention_backend,
        enable_prefix_caching=args.prefix_caching,
        host_kv_cache_gib=args.host_kv_cache_gib,
        unroll_layers=args.unroll_layers,
        **({} if args.decode_steps is None else {"decode_steps": args.decode_steps}),
        max_batch_requests=args.max_batch_requests,
        heartbeat_timeout_s=getattr(args, "heartbeat_timeout", 30.0),
        step_timeout_s=getattr(args, "step_timeout", 300.0),
        **limits,
    )


def _generate(args: argparse.Namespace) -> int:
    from loong_jax import SamplingParams  # noqa: PLC0415

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    llm = load_llm(args, max_num_seqs=1)  # one request: its KV cache is sized for one
    if args.command == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.message}
        ]
        prompt = llm.chat_prompt_ids(messages)
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    n = 0
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    logging.getLogger("loong_jax").info("%d text pieces in %.2fs", n, time.perf_counter() - t0)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from checkpoints import load_checkpoint  # noqa: PLC0415
    from checkpoints.orbax_dir import save  # noqa: PLC0415
    from loong_jax.runtime.platform import parse_dtype  # noqa: PLC0415

    ckpt = load_checkpoint(None if args.source == "default" else args.source, parse_dtype(args.dtype))
    save(args.output, ckpt.config, ckpt.state, ckpt.tokenizer)
    print(f"wrote {args.output} ({ckpt.config.name}, {args.dtype})")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from loong_jax.profiling import profile, profile_path  # noqa: PLC0415

    llm = load_llm(args, max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens)
    report = profile(llm.engine, repeats=args.repeats)
    path = args.output or profile_path(report.cost.key)
    report.cost.save(path)
    print(f"wrote {path} (key {report.cost.key})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose or args.command == "serve"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    from checkpoints.load import CheckpointError  # noqa: PLC0415

    try:
        dist = distributed_settings(args) if args.command == "serve" else None
        devices = getattr(args, "num_instances", 1) * getattr(args, "tp", 1)
        if dist is not None:
            initialize(dist, local_cpu_devices=devices // dist.num_processes)
        elif devices > 1:
            use_virtual_cpu_devices(devices)
        if args.command == "serve":
            from serving.server import access_from_args, serve  # noqa: PLC0415

            access_from_args(args)  # inconsistent access options fail before the model loads
            llm = load_llm(args, max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens)
            if llm.is_follower:
                logging.getLogger("loong_jax").info("process %d: following process 0", dist.process_id)
                llm.follow()
                shutdown()
                return 0
            try:
                return serve(args, llm)
            finally:
                llm.close()
                if dist is not None:
                    shutdown()
        if args.command == "profile":
            return _profile(args)
        return _convert(args) if args.command == "convert" else _generate(args)
    except (CheckpointError, ValueError, NotImplementedError) as e:
        print(f"loong: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
