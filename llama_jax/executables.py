"""Compiled serve programs kept on disk beside the compilation cache, so a restart skips tracing
and lowering as well as compiling: a warm start loads each executable instead of rebuilding it.

An executable is stored under a key hashing everything that determines it: this package's
source, jax and jaxlib, the backend and its devices, XLA_FLAGS, the program's name and static
arguments, and the shapes, dtypes, shardings and tree of its arguments (the caller adds the
model and engine configs). A changed key loads nothing; an unreadable entry is rebuilt. Each
build touches what it loads and deletes what no build has loaded or stored for `KEEP_DAYS`
(an upgrade's old programs, a config no longer served) and writes that were cut short.

Only a freshly compiled executable is stored: on CPU (jaxlib 0.10) an executable that JAX's
persistent cache loaded serializes without its kernels, and the copy fails when run. So a
program missing here is compiled under a module name carrying its key, which JAX's cache
(keyed by the module) has not seen, and a compile that still came from JAX's cache is not stored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path

import jax
import jaxlib
from jax.experimental import serialize_executable
from jax.extend.mlir import ir

from llama_jax.compiles import CACHE_HIT_EVENT, compile_in_threads

log = logging.getLogger(__name__)

Program = tuple[str, Callable, tuple, dict]  # (name, jitted function, arguments, static keyword arguments)
KEEP_DAYS = 14  # an executable no build has used for this long is deleted


def source_digest(package: Path = Path(__file__).parent) -> str:
    """A hash of every Python file of this package: a code edit makes every key new."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _leaf_signature(leaf: object) -> str:
    shape, dtype = getattr(leaf, "shape", ()), getattr(leaf, "dtype", type(leaf).__name__)
    return f"{shape}:{dtype}:{getattr(leaf, 'weak_type', '')}:{getattr(leaf, 'sharding', '')}"


def program_key(program: Program, context: str, source: str) -> str:
    """The store key of one program: its name, static arguments and argument signature (tree,
    shapes, dtypes, shardings), the caller's `context` (model and engine configs), the package
    `source` digest, the jax versions, backend, devices and XLA flags."""
    name, _, args, static = program
    leaves, tree = jax.tree.flatten(args)
    backend = jax.devices()[0].client
    parts = [name, repr(sorted(static.items())), str(tree), *map(_leaf_signature, leaves), context, source,
             jax.__version__, jaxlib.__version__,
             backend.platform, backend.platform_version, repr(jax.devices()), os.environ.get("XLA_FLAGS", ""),
             str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load(directory: Path, key: str) -> jax.stages.Compiled | None:
    """The executable stored under `key`, or None (absent, or unreadable: logged, then rebuilt)."""
    path = directory / f"{key}.exe"
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):  # a read-only store is still read
        path.touch()  # used: kept by `prune`
    try:
        executable, in_tree, out_tree, device_ids = pickle.loads(zlib.decompress(blob))
        devices = {d.id: d for d in jax.devices()}
        return serialize_executable.deserialize_and_load(executable, in_tree, out_tree,
                                                         execution_devices=[devices[i] for i in device_ids])
    except Exception:  # noqa: BLE001 - a truncated or foreign entry: compile instead
        log.warning("cannot load the stored executable %s; compiling it", path, exc_info=True)
        return None


def save(directory: Path, key: str, compiled: jax.stages.Compiled) -> None:
    """Store `compiled` under `key` (written whole, then renamed: a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.exe"
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    devices = compiled._executable.xla_executable.local_devices()  # its device assignment, in order
    blob = pickle.dumps((*serialize_executable.serialize(compiled), [d.id for d in devices]))
    partial.write_bytes(zlib.compress(blob, 1))  # a sixth of the size, 10 ms a program
    partial.replace(path)


def prune(directory: Path, keep_days: float = KEEP_DAYS) -> int:
    """Delete the executables in `directory` no build has loaded or stored for `keep_days`, and
    partial writes older than an hour (a process killed mid-write); returns how many went."""
    now, gone = time.time(), 0
    for path in [*directory.glob("*.exe"), *directory.glob("*.tmp")]:
        try:
            if now - path.stat().st_mtime > (keep_days * 86400 if path.suffix == ".exe" else 3600):
                path.unlink()
                gone += 1
        except OSError:  # another process pruned it first, or a read-only store
            continue
    return gone


class _FreshCompiles:
    """Counts, per thread, the programs loaded from JAX's persistent cache while it is open, so a
    compile can tell whether it ran fresh: only those executables are stored (module docstring)."""

    def __init__(self) -> None:
        self.hits: collections.Counter[int] = collections.Counter()

    def _event(self, event: str, **_: object) -> None:
        if event == CACHE_HIT_EVENT:  # recorded in the compiling thread
            self.hits[threading.get_ident()] += 1

    def __enter__(self) -> _FreshCompiles:
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_listener(self._event)


@dataclasses.dataclass
class _Tracked:
    """A lowered program that, compiled (by `compile_in_threads`, in its thread), stores its
    executable under `key` in `directory` if the compile ran fresh."""

    lowered: jax.stages.Lowered
    counter: _FreshCompiles
    directory: Path | None
    key: str | None

    def compile(self, options: dict | None = None) -> jax.stages.Compiled:
        before = self.counter.hits[threading.get_ident()]
        compiled = self.lowered.compile(options)
        if self.directory is not None and self.key is not None and self.counter.hits[threading.get_ident()] == before:
            try:
                save(self.directory, self.key, compiled)
            except Exception:  # noqa: BLE001 - a full disk or an unserializable program: serve anyway
                log.warning("cannot store an executable under %s", self.directory, exc_info=True)
        return compiled


def build(programs: Mapping[Hashable, Program], directory: Path | None, context: str, threads: int | None = None,
          progress: Callable[[int, int, str, float], None] | None = None) -> dict[Hashable, jax.stages.Compiled]:
    """Every program's executable, by its id in `programs`: loaded from `directory` where stored
    under its key, else traced, lowered and compiled (several at once) and stored there, when
    compiled fresh. Without a directory, compiled only. `progress(done, total, what, seconds)`
    as each is ready, `what` saying "loaded" or "compiled" and the program's name."""
    out: dict[Hashable, jax.stages.Compiled] = {}
    keys: dict[Hashable, str] = {}
    if directory is not None:
        source = source_digest()
        keys = {ident: program_key(program, context, source) for ident, program in programs.items()}
        for ident, executable, seconds in _load_in_threads(directory, keys, threads):
            if executable is not None:
                out[ident] = executable
                if progress:
                    progress(len(out), len(programs), f"loaded {programs[ident][0]}", seconds)
    missing = {ident: p for ident, p in programs.items() if ident not in out}
    names = {p[0]: ident for ident, p in missing.items()}
    offset = len(out)
    step = None if progress is None else (lambda done, total, name, seconds:
                                          progress(offset + done, len(programs), f"compiled {name}", seconds))
    with _FreshCompiles() as counter:
        tracked = [(name, _Tracked(_named(fn.lower(*args, **static), keys.get(names[name])), counter, directory,
                                   keys.get(names[name]))) for name, fn, args, static in missing.values()]
        compiled = compile_in_threads(tracked, threads, step)  # type: ignore[arg-type]
    out.update({names[name]: executable for name, (executable, _) in compiled.items()})
    if directory is not None and directory.exists() and (gone := prune(directory)):
        log.info("deleted %d stored executables unused for %d days from %s", gone, KEEP_DAYS, directory)
    return out


def calls_through(jitted: Callable, built: Mapping[Hashable, jax.stages.Compiled],
                  ident: Callable[[tuple, dict], Hashable]) -> Callable:
    """`jitted`, its calls run by the executable `built` holds for their program (`ident(args,
    static)`); a call of no built program goes to `jitted` (and compiles, as a compile counter sees)."""
    def call(*args, **static):
        executable = built.get(ident(args, static))
        return jitted(*args, **static) if executable is None else executable(*args)

    return call


def _named(lowered: jax.stages.Lowered, key: str | None) -> jax.stages.Lowered:
    """`lowered` with its module named for its store `key`, so that JAX's persistent cache, keyed
    by the module's text, holds it only if this store compiled it before: its compile runs fresh
    and can be stored, never loaded from an entry an older version or another process left."""
    if key is not None:
        module = lowered.compiler_ir()  # the module `compile` compiles
        with module.context:
            name = ir.StringAttr(module.operation.attributes["sym_name"]).value
            module.operation.attributes["sym_name"] = ir.StringAttr.get(f"{name}_{key[:16]}")
    return lowered


def _load_in_threads(directory: Path, keys: Mapping[Hashable, str], threads: int | None
                     ) -> Iterator[tuple[Hashable, jax.stages.Compiled | None, float]]:
    """(id, stored executable or None, seconds) for each key, loaded several at once (loading
    links the executable's code outside the GIL), as each is done."""
    def timed(key: str) -> tuple[jax.stages.Compiled | None, float]:
        start = time.perf_counter()
        return load(directory, key), time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(keys), threads or os.cpu_count() or 1)),
                                               thread_name_prefix="llama-jax-load") as pool:
        futures = {pool.submit(timed, key): ident for ident, key in keys.items()}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], *future.result()
