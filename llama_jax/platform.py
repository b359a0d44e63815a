"""The platform the serving programs are built for: the devices JAX sees, or a named GPU that is
compiled for without one.

One `Platform` (kind, device kind, memory per device, the custom-kernel families it runs) is made
once, by `host()` from the real devices or by `target(name)` from an XLA GPU target config that
ships with the package (`llama_jax/targets/*.txtpb`, copied from openxla/xla; each file names
its source commit), and is passed to everything that picks a form or a kernel per platform: the
dtype `auto` means, the storage form of weights and KV cache, the attention kernels, the
sampler, the int8 matmuls. This is the only module that asks JAX which backend it runs on.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources

import jax

TARGETS = ("h100", "h200")  # llama_jax/targets/<name>.txtpb
KERNELS = ("triton", "cudnn")  # Pallas-Triton decode attention; cuDNN flash attention (prefill)
# Fields of newer XLA target configs that an older jaxlib's proto parser refuses (jaxlib 0.10
# knows none of these): dropped, and the parse retried, only when the full text is refused.
NEWER_FIELDS = ("collective_memory_granularity", "mem_clock_ghz", "reserved_shared_memory_per_block",
                "max_blocks_per_multiprocessor")


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the programs are compiled for.

    `kind`: "cpu", "gpu" or "tpu"; `device_kind`: e.g. "NVIDIA H200 141GB HBM3e"; `memory`: bytes
    per device (the allocator's limit on a real accelerator, the device's size for a target;
    None where unknown); `kernels`: the custom-kernel families this platform runs (`KERNELS`);
    `target`: the target's name when compiling without the device (None: the real devices).
    """

    kind: str
    device_kind: str = ""
    memory: int | None = None
    kernels: frozenset[str] = frozenset()
    target: str | None = None

    @property
    def cpu(self) -> bool:
        return self.kind == "cpu"

    def has(self, kernel: str) -> bool:
        """Whether this platform runs a kernel family ("triton", "cudnn")."""
        return kernel in self.kernels

    @property
    def name(self) -> str:
        """How reports name it: the target, else the backend and device kind."""
        return self.target or (self.kind if self.cpu else f"{self.kind} ({self.device_kind})")


def _kind(backend: str) -> str:
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


@functools.cache
def host() -> Platform:
    """The platform of the devices this process sees (made once)."""
    backend = jax.default_backend()
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    memory = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    kernels: frozenset[str] = frozenset()
    if _kind(backend) == "gpu":
        cuda = "rocm" not in str(getattr(device.client, "platform_version", "")).lower()
        kernels = frozenset({"triton", "cudnn"} if cuda else {"triton"})
    return Platform(kind=_kind(backend), device_kind=str(getattr(device, "device_kind", backend)),
                    memory=memory, kernels=kernels)


def resolve(platform: Platform | None) -> Platform:
    """`platform`, or the host's where none is given."""
    return host() if platform is None else platform


def target_config(name: str) -> str:
    """The shipped XLA GpuTargetConfigProto text of a target (`TARGETS`)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}: one of {', '.join(TARGETS)}")
    return resources.files("llama_jax").joinpath("targets", f"{name}.txtpb").read_text()


def _without_newer_fields(text: str) -> str:
    return re.sub(rf"^\s*({'|'.join(NEWER_FIELDS)}):.*\n", "", text, flags=re.M)


def target(name: str, tp: int = 1) -> tuple[Platform, list[jax.Device]]:
    """A named GPU (`TARGETS`) and `tp` abstract devices of it to compile for, on any machine.

    Needs JAX's CUDA plugin (`pip install 'llama-jax[gpu-plan]'`) and ptxas; no GPU. Programs
    lowered on shapes sharded over these devices compile with XLA's real GPU compiler."""
    from jax.experimental import topologies

    text = target_config(name)
    topology = dict(platform="cuda", topology=f"1x1x{tp}")
    try:
        try:
            desc = topologies.get_topology_desc(name, target_config=text, **topology)
        except jax.errors.JaxRuntimeError as e:
            if "parse GpuTargetConfigProto" not in str(e):
                raise
            desc = topologies.get_topology_desc(name, target_config=_without_newer_fields(text), **topology)
    except (RuntimeError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot compile for {name} here ({type(e).__name__}: {e}); it needs JAX's CUDA plugin: "
                           "pip install 'llama-jax[gpu-plan]'") from e
    memory = re.search(r"^\s*device_memory_size:\s*(\d+)", text, flags=re.M)
    devices = list(desc.devices)
    return Platform(kind="gpu", device_kind=str(devices[0].device_kind), memory=int(memory.group(1)) if memory else None,
                    kernels=frozenset(KERNELS), target=name), devices
