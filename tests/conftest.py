"""Shared test fixtures: the real Llama 2 tokenizer from ../shared and CPU-only JAX."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU, with 8 virtual devices so tensor-parallel paths can be exercised, and the engines they
# build in process compile fast: LLVM code unoptimised, fusions by XLA:CPU's older emitters (the same XLA programs,
# a tiny engine's warm-up 14.5 -> 6.8 s; compiling is most of the suite's time). So do the random-weight servers
# they start (live_server.subprocess_env).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
# One OpenMP thread for torch (the transformers references): two xdist workers share two cores, and torch's
# threads wait at each op's barrier for one the other worker has descheduled (5 greedy replies: 36 s -> 7 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """One persistent compilation cache for the whole run, empty at the start, made once by the
    process that runs the tests or, under `-n`, by xdist's controller before its workers start, so
    every worker shares it (they inherit $LLAMA_JAX_COMPILATION_CACHE)."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made it
        return
    config.compilation_cache = tempfile.mkdtemp(prefix="llama-jax-test-xla-")
    os.environ["LLAMA_JAX_COMPILATION_CACHE"] = config.compilation_cache


def pytest_unconfigure(config):
    if getattr(config, "compilation_cache", None):
        shutil.rmtree(config.compilation_cache, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache():
    """The run's compilation cache for in-process engines; `llama-jax serve` processes the tests
    start read the same folder through $LLAMA_JAX_COMPILATION_CACHE. A program that several
    engines or servers build (the same model and shapes) compiles once, and no test writes into
    the user's own cache. CompileCounter counts cache loads as builds, so the zero-compile tests
    lose nothing."""
    from llama_jax.compiles import enable_compilation_cache

    directory = os.environ["LLAMA_JAX_COMPILATION_CACHE"]
    enable_compilation_cache(directory)
    return directory


REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_PATH = REPO_ROOT.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"
SMOLLM2_GGUF = REPO_ROOT.parent / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """Path of the real Llama 2 SentencePiece model; skips where ../shared does not hold it."""
    if not TOKENIZER_PATH.exists():
        pytest.skip(f"real Llama 2 tokenizer not found at {TOKENIZER_PATH} (it lives in ../shared, never in the repo)")
    return TOKENIZER_PATH


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a random-weight HF-layout checkpoint for a preset (written once per session), with
    the real tokenizer beside it when ../shared has it (model-only tests do not need it)."""
    from llama_jax.config import preset
    from llama_jax.hf_checkpoint import write_tiny_checkpoint

    made: dict[tuple[str, int, str | None], Path] = {}

    def get(name: str, seed: int = 0, dtype: str | None = None) -> Path:
        key = (name, seed, dtype)
        if key not in made:
            cfg = preset(name)
            cfg = cfg.replace(dtype=dtype) if dtype else cfg
            out = tmp_path_factory.mktemp(f"hf-{name}-{seed}-{dtype or cfg.dtype}")
            tokenizer = TOKENIZER_PATH if TOKENIZER_PATH.exists() else None
            made[key] = write_tiny_checkpoint(out, cfg, seed=seed, tokenizer_path=tokenizer, shard_bytes=2**20)
        return made[key]

    return get


@pytest.fixture(scope="session")
def demo_checkpoint_dir(tmp_path_factory) -> Path:
    """The built-in demo model (random weights, its own trained tokenizer), built once per session."""
    from llama_jax.demo import demo_checkpoint

    return demo_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_engine(demo_checkpoint_dir):
    """A warmed-up engine on the demo model, shared by the tests that need `llama-jax serve`'s default
    model (structured output, fuzzing, logit_bias); small prefill batches keep its warm-up short."""
    from llama_jax import checkpoint
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.tokenizer import Tokenizer

    loaded = checkpoint.load(demo_checkpoint_dir)
    config = EngineConfig(max_slots=8, max_seq_len=512, min_prefill_bucket=32,
                          max_prefill_tokens=128)  # 512: the demo's 2000 pieces make tool prompts ~250 tokens
    engine = Engine(loaded.model, Tokenizer(loaded.tokenizer_path), config).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny-gqa random-weight model (HF layout, loaded through the real reader), once per session."""
    from llama_jax.hf_checkpoint import load_hf_model

    return load_hf_model(tiny_checkpoint("tiny-gqa"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    """The real Llama 2 tokenizer (skips where ../shared lacks it)."""
    from llama_jax.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory, worker_id):
    """The README's quick start, `llama-jax serve` with no checkpoint: the real default model,
    SmolLM2-135M-Instruct, its GGUF already in the cache (as the first start leaves it; here from
    ../shared, not downloaded). With a 512-token context, so its warm-up fits the suite's budget
    (the default 2048 adds the two longest prefill programs, about 90 s on 2 cores). The xdist
    workers of one run share its compilation cache, one start at a time: the second start is warm."""
    from filelock import FileLock
    from live_server import ServeProcess

    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"the real SmolLM2 GGUF is not at {SMOLLM2_GGUF} (it lives in ../shared, never in the repo)")
    cache = tmp_path_factory.mktemp("quick-start-cache")
    (cache / "models").mkdir()
    (cache / "models" / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
    run_root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with FileLock(run_root / "quick-start-xla.lock"):
        server = ServeProcess(cache, "--max-seq-len", "512", "--compilation-cache-dir", str(run_root / "quick-start-xla"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' float32 SmolLM2 model and tokenizer from the same GGUF: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"the real SmolLM2 GGUF is not at {SMOLLM2_GGUF} (it lives in ../shared, never in the repo)")
    folder, name = SMOLLM2_GGUF.parent, SMOLLM2_GGUF.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny-gqa random model, loaded once per module that uses it."""
    from llama_jax.hf_checkpoint import load_hf_model

    return load_hf_model(tiny_checkpoint("tiny-gqa"))


@pytest.fixture(scope="module")
def strict(model, tokenizer_path):
    """A live app with API keys, a 4 KiB body limit and no queue, whose engine never runs a step
    (for the error paths)."""
    from api.app import create_app
    from api.settings import ServerSettings
    from helpers import KEYS
    from live_server import LiveServer
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.tokenizer import Tokenizer

    config = EngineConfig(max_slots=8, max_seq_len=256, max_queue=0)
    engine = Engine(model, Tokenizer(tokenizer_path), config).start(warmup=False)
    server = LiveServer(create_app(engine, ServerSettings(api_keys=KEYS, max_body_bytes=4096, retry_after_s=3)),
                        engine)
    yield server
    server.stop()
    engine.stop()


# Modules whose parametrized tests repeat a costly build (an engine or a compile) per variant: the
# quick tier (`-m "not slow"`) runs the first variant of each, CI runs them all.
FIRST_VARIANT_ONLY_WHEN_QUICK = {"test_engine", "test_quantize", "test_sharding", "test_sampling", "test_attention",
                                 "test_model", "test_real_shapes", "test_api_tools"}


def pytest_collection_modifyitems(config, items):
    seen: set[tuple[str, str]] = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module not in FIRST_VARIANT_ONLY_WHEN_QUICK or not hasattr(item, "callspec"):
            continue
        family = (module, item.originalname)
        if family in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(family)
