"""Where models run and in which precision: one decision, taken once, honoured by every stage.

* :func:`resolve_device` turns the ``device`` config key (``auto``, ``cpu``, ``cuda``,
  ``cuda:N``) into a ``torch.device``: ``auto`` is the first CUDA device when one is present.
* :func:`auto_dtype` picks the compute dtype that is fast *on that device*. On CUDA that is
  bf16 (every GPU since Ampere multiplies bf16 on its tensor cores). On a CPU it depends on the
  chip: with AMX (``amx_bf16`` in ``/proc/cpuinfo``) bf16 matmul ran 2-4x faster than fp32 on the
  developers' machines; without it (AVX-512 + avx512_bf16 only) bf16 ran at 145 GFLOP/s against
  fp32's 277 (DESIGN.md, 512x576x1536) - so fp32 there.
* :class:`MemoryWatch` measures a stage's peak memory on its device: ``torch.cuda``'s allocator
  peak on CUDA, the process's peak resident set (VmHWM, reset per stage through
  ``/proc/self/clear_refs``) on a CPU.

Device behaviour sits in a small registry (:data:`DEVICE_KINDS`, one entry per ``device.type``),
so no caller tests device names.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("opsd")

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("float32", "bfloat16")


class DeviceError(ValueError):
    """A device that this machine does not have; the message says what is there."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → ``cuda:<current>`` when CUDA is available, else ``cpu``. ``cuda`` names the
    current CUDA device; ``cuda:N`` must exist."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip()
    if not DEVICE_PATTERN.match(spec):
        raise DeviceError(f"device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but this machine has no CUDA device that "
                          f"torch {torch.__version__} can use; set device: cpu (or auto)")
    dev = torch.device(spec)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s), cuda:0 .. cuda:{n}".format(n=torch.cuda.device_count() - 1))
    return torch.device("cuda", index)


# ------------------------------------------------------------------ compute dtype


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bfloat16" or "float32"
    reason: str  # one line, logged and recorded with the run


def auto_dtype(device: torch.device) -> DtypeChoice:
    """The fast compute dtype on ``device`` (see the module docs)."""
    return DEVICE_KINDS[device.type].fast_dtype(device)


def resolve_dtype(value: str, device: torch.device) -> str:
    """A config dtype (``auto``, ``float32``, ``bfloat16``) as the dtype that will run."""
    return auto_dtype(device).dtype if value == "auto" else value


# ------------------------------------------------------------------ per-device behaviour


@dataclass(frozen=True)
class DeviceKind:
    """What differs between device types: the fast dtype, freeing cached memory, peak memory."""

    fast_dtype: Callable[[torch.device], DtypeChoice]
    empty_cache: Callable[[], None]
    synchronize: Callable[[torch.device], None]
    reset_peak: Callable[[torch.device], bool]  # False: the peak cannot be reset here
    peak_bytes: Callable[[torch.device], int | None]
    peak_source: str  # what the peak figure is


def _cpu_dtype(device: torch.device) -> DtypeChoice:
    if "amx_bf16" in cpu_flags():
        return DtypeChoice("bfloat16", "CPU has AMX (amx_bf16): bf16 matmul is 2-4x fp32's speed")
    return DtypeChoice("float32", "CPU has no AMX (no amx_bf16 flag): bf16 matmul would run at "
                                  "about half fp32's speed")


def _cuda_dtype(device: torch.device) -> DtypeChoice:
    if torch.cuda.is_bf16_supported():
        return DtypeChoice("bfloat16", f"{torch.cuda.get_device_name(device)} computes bf16 on "
                                       "tensor cores")
    return DtypeChoice("float32", f"{torch.cuda.get_device_name(device)} has no bf16 support")


_CLEAR_REFS = Path("/proc/self/clear_refs")


def _cpu_reset_peak(device: torch.device) -> bool:
    # Writing 5 resets the process's peak resident set size (VmHWM) to the current one
    # (Linux >= 4.0); elsewhere the peak stays the process lifetime's and is not reported.
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak(device: torch.device) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cuda_reset_peak(device: torch.device) -> bool:
    torch.cuda.reset_peak_memory_stats(device)
    return True


DEVICE_KINDS: dict[str, DeviceKind] = {
    "cpu": DeviceKind(fast_dtype=_cpu_dtype, empty_cache=lambda: None,
                      synchronize=lambda d: None, reset_peak=_cpu_reset_peak, peak_bytes=_cpu_peak,
                      peak_source="process peak resident set (VmHWM)"),
    "cuda": DeviceKind(fast_dtype=_cuda_dtype, empty_cache=lambda: torch.cuda.empty_cache(),
                       synchronize=lambda d: torch.cuda.synchronize(d),
                       reset_peak=_cuda_reset_peak,
                       peak_bytes=lambda d: int(torch.cuda.max_memory_allocated(d)),
                       peak_source="torch.cuda.max_memory_allocated"),
}


def kind(device: torch.device) -> DeviceKind:
    try:
        return DEVICE_KINDS[device.type]
    except KeyError:
        raise DeviceError(f"device type {device.type!r} is not supported (known: "
                          f"{', '.join(DEVICE_KINDS)})") from None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on an asynchronous device)."""
    kind(device).synchronize(device)


def empty_cache(device: torch.device) -> None:
    """Hand the allocator's cached free blocks back to the device (between stages on CUDA: the
    next stage's models and activations get one unfragmented pool)."""
    kind(device).empty_cache()


class MemoryWatch:
    """Peak memory of a block on ``device``::

        with MemoryWatch(device) as mem:
            ...
        manifest.update(mem.fields())
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._kind = kind(device)
        self._reset = False
        self.peak: int | None = None

    def __enter__(self) -> "MemoryWatch":
        self._reset = self._kind.reset_peak(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self._kind.peak_bytes(self.device) if self._reset else None

    def fields(self) -> dict:
        """The manifest fields: the device, its peak memory in GiB (None where unmeasurable)
        and what that figure is."""
        return {"device": str(self.device),
                "peak_memory_gib": None if self.peak is None else round(self.peak / 2**30, 4),
                "peak_memory_source": self._kind.peak_source if self.peak is not None else None}
