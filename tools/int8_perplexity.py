"""Perplexity of a small Llama trained for a few minutes, float32 against int8 weights.

Random-weight models are flat enough that logits error and KL say little about what int8 costs
a trained model, so this trains a small Llama (the real 32000-piece vocabulary) on this
repository's own docs for `--steps` Adam steps, saves it as a float32 checkpoint, loads it back
as float32 and with `quantization="int8"` (the load-time path of `serve --quantize int8`), and
reports held-out perplexity for float32, int8 weight-only and int8 with int8 inputs.

    python tools/int8_perplexity.py --steps 300        # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_jax import checkpoint  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.kv_cache import init_cache  # noqa: E402
from llama_jax.model import init_model, storage_params, tensors  # noqa: E402
from llama_jax.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"


def corpus(tokenizer: Tokenizer) -> np.ndarray:
    """The repository's Markdown docs as one token stream."""
    text = "\n\n".join(p.read_text() for p in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]))
    return np.array(tokenizer.encode(text), np.int32)


def batches(ids: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        yield np.stack([ids[s:s + seq + 1] for s in starts])


def nll(model, windows: np.ndarray) -> jax.Array:
    """Mean next-token negative log-likelihood over `[B, T + 1]` windows."""
    b, t = windows.shape[0], windows.shape[1] - 1
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(windows[:, :-1], positions, init_cache(model.cfg, b, t))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1))


def train(cfg: LlamaConfig, ids: np.ndarray, steps: int, seq: int, batch: int, lr: float) -> nnx.State:
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps // 2), max(steps, 2), lr / 10), weight_decay=0.01)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(lambda p: nll(nnx.merge(graphdef, p), windows))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i, windows in zip(range(steps), batches(ids, seq, batch, rng)):
        params, opt_state, loss = step(params, opt_state, windows)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i}: loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return params


def save(cfg: LlamaConfig, params: nnx.State, out: Path) -> None:
    """The trained weights as a converted float32 checkpoint (what convert-weights writes)."""
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    checkpoint.save(out, cfg, ((t, flat[t.path][t.layer] if t.layer is not None else flat[t.path]) for t in tensors(cfg)))


def perplexity(loaded, mode: str | None, ids: np.ndarray, seq: int) -> float:
    params = storage_params(loaded.cfg, loaded.params, False, mode) if mode else loaded.params
    model = nnx.merge(loaded.graphdef, params)
    n = (len(ids) - 1) // seq
    windows = np.stack([ids[i * seq:i * seq + seq + 1] for i in range(n)])
    losses = [float(jax.jit(nll)(model, windows[i:i + 8])) * len(windows[i:i + 8]) for i in range(0, n, 8)]
    return float(np.exp(sum(losses) / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args()

    tokenizer = Tokenizer(args.tokenizer)
    ids = corpus(tokenizer)
    split = int(len(ids) * 0.9)
    train_ids, eval_ids = ids[:split], ids[split:]
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                      ffn_dim=int(args.dim * 8 / 3) // 8 * 8, max_seq_len=args.seq, dtype="float32")
    params = train(cfg, train_ids, args.steps, args.seq, args.batch, args.lr)
    result = {"tokens_train": int(len(train_ids)), "tokens_eval": int(len(eval_ids)), "steps": args.steps,
              "dim": args.dim, "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        save(cfg, params, Path(tmp) / "f32")
        f32 = checkpoint.load(Path(tmp) / "f32")
        int8 = checkpoint.load(Path(tmp) / "f32", quantization="int8")
        result["ppl_float32"] = round(perplexity(f32, None, eval_ids, args.seq), 3)
        result["ppl_int8_weight_only"] = round(perplexity(int8, "float", eval_ids, args.seq), 3)
        result["ppl_int8_int8_inputs"] = round(perplexity(int8, "int8", eval_ids, args.seq), 3)
    result["ratio_weight_only"] = round(result["ppl_int8_weight_only"] / result["ppl_float32"], 4)
    result["ratio_int8_inputs"] = round(result["ppl_int8_int8_inputs"] / result["ppl_float32"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
