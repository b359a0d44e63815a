"""Count XLA compilations, to prove that serving never compiles after warm-up."""

from __future__ import annotations

import threading

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Context manager counting backend compiles (all threads) while it is open.

    >>> with CompileCounter() as c:
    ...     run_requests()
    >>> assert c.count == 0
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration: float, **_: object) -> None:
        if event == COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
