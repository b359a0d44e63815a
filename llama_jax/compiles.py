"""XLA compilations: the persistent cache that lets a restart skip them, and a counter that
proves serving never compiles after warm-up."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

log = logging.getLogger(__name__)

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a program loaded from the persistent cache: compiled elsewhere


def compile_all(lowered: Sequence[tuple[str, jax.stages.Lowered]], threads: int,
                progress: Callable[[int, int, str], None] | None = None) -> None:
    """Compile lowered programs (named by what they are) in `threads` threads at once: XLA compiles
    outside the GIL, and jit keeps each executable. A failure cancels the compiles not yet started."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), threads)), thread_name_prefix="llama-jax-compile")
    try:
        futures = {pool.submit(low.compile): what for what, low in lowered}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()
            log.info("warm-up %d/%d: %s", done, len(lowered), futures[future])
            if progress:
                progress(done, len(lowered), futures[future])
    finally:  # a cancelled warm-up waits only for the compiles already running
        pool.shutdown(wait=True, cancel_futures=True)


def enable_compilation_cache(directory: str | Path) -> None:
    """Persist compiled programs in `directory`, so a restarted server skips compiling.

    JAX reads this setting when it first compiles: call it before anything is jitted.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class CompileCounter:
    """Context manager counting the programs (all threads) that had to be built while it is open:
    backend compiles, and loads from the persistent cache (a program some other run compiled).

    >>> with CompileCounter() as c:
    ...     run_requests()
    >>> assert c.count == 0
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def _compiled(self, event: str, duration: float, **_: object) -> None:
        if event == COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def _loaded(self, event: str, **_: object) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._compiled)
        jax.monitoring.register_event_listener(self._loaded)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._compiled)
        jax.monitoring.unregister_event_listener(self._loaded)
