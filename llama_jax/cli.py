"""Engine-side commands: `generate` (stream a chat reply in the terminal), `make-tiny-checkpoint`
and `plan` (what a serving config needs per device, compiled ahead of time without weights).

These need only JAX. The `llama-jax` console script (api/cli.py) adds `serve` on top of them, so
this package never imports the HTTP server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llama_jax.config import DTYPES, PRESETS, QUANTIZATIONS, preset

if TYPE_CHECKING:
    from llama_jax.platform import Platform

TARGETS = ("h100", "h200")  # as llama_jax.platform.TARGETS, without importing JAX to build the parser


def resolve_dtype(dtype: str | None, platform: Platform | None = None) -> str | None:
    """`auto` is bfloat16 on an accelerator and float32 on CPU (where 16-bit is slower), for
    `platform` (default: the host's); None keeps the model's."""
    if dtype != "auto":
        return dtype
    from llama_jax.platform import resolve

    return "float32" if resolve(platform).cpu else "bfloat16"


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_plan(args: argparse.Namespace) -> int:
    """`llama-jax plan`: re-runs itself over fake CPU devices when --tp exceeds the visible ones."""
    import os
    import subprocess

    import jax

    from llama_jax import plan, platform, sharding

    if args.target:
        return _plan_target(args)
    if args.tp > len(jax.devices()):
        if os.environ.get("LLAMA_JAX_PLAN_CHILD"):
            print(f"llama-jax plan: error: --tp {args.tp} but only {len(jax.devices())} devices", file=sys.stderr)
            return 1
        env = dict(os.environ, JAX_PLATFORMS="cpu", LLAMA_JAX_PLAN_CHILD="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.tp}")
        flags = {"--preset": args.preset, "--checkpoint": args.checkpoint, "--dtype": args.dtype,
                 "--quantize": args.quantize, "--tp": args.tp,
                 "--max-slots": args.max_slots, "--max-seq-len": args.max_seq_len,
                 "--max-prefill-tokens": args.max_prefill_tokens, "--memory": args.memory}
        argv = [str(a) for flag, value in flags.items() if value is not None for a in (flag, value)]
        return subprocess.run([sys.executable, "-m", "llama_jax.cli", "plan", *argv, *(["--json"] if args.json else [])],
                              env=env).returncode
    host = platform.host()
    try:
        mesh = sharding.make_mesh(args.tp) if args.tp > 1 else None
    except ValueError as e:
        print(f"llama-jax plan: error: {e}", file=sys.stderr)
        return 1
    return _plan_report(args, host, mesh, default_memory=plan.device_memory_free() if not host.cpu else None)


def _plan_target(args: argparse.Namespace) -> int:
    """`plan --target`: compile for a GPU this machine does not have, over its abstract devices."""
    import os

    import jax

    from llama_jax import plan, platform

    if not os.environ.get("JAX_PLATFORMS"):  # compiled on the host: no GPU backend is needed (and without a
        jax.config.update("jax_platforms", "cpu")  # GPU the CUDA plugin fails its CUPTI check at start-up)
    try:
        target, devices = platform.target(args.target, args.tp)
    except (RuntimeError, ValueError) as e:
        print(f"llama-jax plan: error: {e}", file=sys.stderr)
        return 1
    return _plan_report(args, target, plan.target_mesh(devices), default_memory=target.memory)


def _plan_report(args: argparse.Namespace, target: Platform, mesh, default_memory: int | None) -> int:
    """Plan for `target` over `mesh` (None: one host device) and print the report."""
    import json

    from llama_jax import checkpoint, plan, sharding
    from llama_jax.engine import EngineConfig

    cfg = preset(args.preset) if args.preset else checkpoint.read_config(args.checkpoint)
    dtype = resolve_dtype(args.dtype, target)
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    cfg = cfg.replace(quantization=args.quantize) if args.quantize else cfg
    try:
        if args.tp > 1:
            sharding.check_tp(cfg, args.tp, mesh.size)
        memory = plan.parse_bytes(args.memory) if args.memory else default_memory
    except ValueError as e:
        print(f"llama-jax plan: error: {e}", file=sys.stderr)
        return 1
    config = EngineConfig(max_slots=args.max_slots, max_seq_len=args.max_seq_len,
                          max_prefill_tokens=args.max_prefill_tokens, platform=target)
    say = (lambda *a: None) if args.json else (lambda name, s: print(f"  compiled {name} ({s:.1f} s)", file=sys.stderr))
    report = plan.plan(cfg, config, mesh, memory, progress=say)
    if args.json:
        print(json.dumps(report))
        return 0
    per = report["per_device_bytes"]
    weights = f"{cfg.dtype} with int8 matrices" if cfg.quantization else cfg.dtype
    print(f"{args.preset or args.checkpoint}, {weights}, tp {report['devices']}, {args.max_slots} slots x "
          f"{config.max_seq_len or cfg.max_seq_len} tokens, on {report['platform']} ({report['device_kind']})")
    print(f"  programs: {report['programs']}, compiled in {report['compile_s']:.1f} s")
    print(f"  per device: weights {_human(per['weights'])}, KV cache {_human(per['kv_cache'])}, "
          f"largest program's temporaries {_human(per['temp'])}")
    for kernel in report["kernels"]:
        calls = [name for name, p in report["per_program"].items() if kernel in p["kernels"]]
        print(f"  custom kernel {kernel}: in {len(calls)} of {report['programs']} programs")
    width = max(map(len, report["per_program"]))
    print(f"  {'program':<{width}}  compile s  temporaries  conditionals  dynamic whiles")  # the last two wait on the host on a GPU
    for name, p in report["per_program"].items():
        print(f"  {name:<{width}}  {p['compile_s']:9.1f}  {_human(p['temp']):>11}  {p['conditionals']:12d}  {p['dynamic_whiles']:14d}")
    if report["max_slots_that_fit"] is not None:
        print(f"  slots that fit {_human(memory)}: {report['max_slots_that_fit']}")
    return 0



def add_engine_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `make-tiny-checkpoint` on a subparsers object."""
    gen = subparsers.add_parser("generate", help="stream a chat completion for one prompt in the terminal")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--checkpoint", type=Path, help="a directory written by convert-weights, a GGUF file or a Hugging "
                     "Face model directory (converted once into the cache; default: the demo model)")
    gen.add_argument("--system", help="an optional system message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-seq-len", type=int, default=512, help="context to compile for (default 512)")
    gen.set_defaults(run=run_generate)

    tiny = subparsers.add_parser("make-tiny-checkpoint", help="write a random-weight Llama in Hugging Face layout")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--preset", default="tiny-gqa", choices=sorted(PRESETS), help="base shape (default tiny-gqa)")
    tiny.add_argument("--layers", type=int)
    tiny.add_argument("--dim", type=int)
    tiny.add_argument("--heads", type=int)
    tiny.add_argument("--kv-heads", type=int)
    tiny.add_argument("--ffn-dim", type=int)
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    tiny.add_argument("--vocab-from", type=Path, metavar="TOKENIZER",
                      help="a SentencePiece tokenizer.model: sets the vocabulary size and is copied alongside")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=run_make_tiny)

    plan = subparsers.add_parser(
        "plan", help="what a serve config needs per device: compiled ahead of time from shapes, no weights",
        description="Compile every program `serve` would compile, from abstract shapes on this machine, and "
                    "report per-device weights, KV cache and temporaries, and how many slots fit a memory size.")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, e.g. llama-2-70b")
    source.add_argument("--checkpoint", type=Path, help="a directory written by convert-weights (its config only)")
    plan.add_argument("--dtype", choices=["auto", *DTYPES], default=None,
                      help="weights and cache dtype (default: the preset's or checkpoint's; auto: bf16 on GPU/TPU, f32 on CPU)")
    plan.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                      help="int8: plan for int8 matrices with per-channel scales (a --quantize int8 checkpoint or serve); "
                           "an int8 checkpoint is planned as int8 without it")
    plan.add_argument("--target", choices=TARGETS, default=None,
                      help="compile for this GPU with XLA's GPU compiler, on any machine (needs the [gpu-plan] extra); "
                           "default: this machine's devices")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (fake CPU devices when more than visible, "
                                                         "or that many devices of the --target)")
    plan.add_argument("--max-slots", type=int, default=8)
    plan.add_argument("--max-seq-len", type=int, default=None)
    plan.add_argument("--max-prefill-tokens", type=int, default=512)
    plan.add_argument("--memory", help="memory per device, e.g. 80GiB: report how many slots fit")
    plan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    plan.set_defaults(run=run_plan)


def run_make_tiny(args: argparse.Namespace) -> int:
    from llama_jax.hf_checkpoint import param_count, write_tiny_checkpoint
    from llama_jax.tokenizer import Tokenizer

    overrides = {"n_layers": args.layers, "dim": args.dim, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
                 "ffn_dim": args.ffn_dim, "dtype": args.dtype}
    cfg = preset(args.preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.vocab_from:
        cfg = cfg.replace(vocab_size=Tokenizer(args.vocab_from).vocab_size)
    write_tiny_checkpoint(args.out_dir, cfg, seed=args.seed, tokenizer_path=args.vocab_from)
    print(f"wrote a random {param_count(cfg):,}-parameter Llama ({cfg.dtype}) to {args.out_dir}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from llama_jax import checkpoint
    from llama_jax.demo import demo_checkpoint
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.model_store import resolve_checkpoint
    from llama_jax.request import Request, SamplingOptions
    from llama_jax.tokenizer import apply_chat_template, load_tokenizer

    loaded = checkpoint.load(resolve_checkpoint(args.checkpoint) if args.checkpoint else demo_checkpoint())
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    prompt = apply_chat_template(tokenizer, messages)
    config = EngineConfig(max_slots=1, max_seq_len=args.max_seq_len)
    engine = Engine(loaded.model, tokenizer, config)
    engine.start(progress=lambda done, total, what, seconds: print(f"\rcompiling {done}/{total} ({what})   ", end="",
                                                                 file=sys.stderr))
    print(file=sys.stderr)
    try:
        sampling = SamplingOptions(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for event in engine.submit(Request(prompt=prompt, sampling=sampling, max_tokens=args.max_tokens)):
            print(event.text, end="", flush=True)
            if event.error:
                print(f"\nerror: {event.error}", file=sys.stderr)
                return 1
        print()
    finally:
        engine.stop()
    return 0


def build_parser(prog: str = "llama-jax") -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser with the engine commands; callers may add more subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description="Llama-family inference in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(subparsers)
    return parser, subparsers


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
