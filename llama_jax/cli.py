"""Engine-side commands: `generate` (stream a chat reply in the terminal) and `make-tiny-checkpoint`.

These need only JAX. The `llama-jax` console script (api/cli.py) adds `serve` on top of them, so
this package never imports the HTTP server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_jax.config import PRESETS, preset


def add_engine_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `make-tiny-checkpoint` on a subparsers object."""
    gen = subparsers.add_parser("generate", help="stream a chat completion for one prompt in the terminal")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--checkpoint", type=Path, help="a directory written by convert-weights (default: the demo model)")
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
    from llama_jax.request import Request, SamplingOptions
    from llama_jax.tokenizer import Tokenizer, apply_chat_template

    loaded = checkpoint.load(args.checkpoint or demo_checkpoint())
    tokenizer = Tokenizer(loaded.tokenizer_path)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    prompt = apply_chat_template(tokenizer, messages)
    config = EngineConfig(max_slots=1, max_seq_len=args.max_seq_len)
    engine = Engine(loaded.model, tokenizer, config)
    engine.start(progress=lambda done, total, what: print(f"\rcompiling {done}/{total} ({what})   ", end="", file=sys.stderr))
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
    parser = argparse.ArgumentParser(prog=prog, description="Llama 2 inference in JAX.")
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
