"""Choosing the compute device, and saying why (users' first question when a GPU sits idle)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

from buseg.errors import ConfigError


def resolve_device(spec: str = "auto") -> tuple[torch.device, str]:
    """The device for ``spec`` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps') and a reason in words.

    'auto' picks CUDA, then Apple MPS, then the CPU. Asking for a device that is not
    available is an error that says what torch sees, never a silent fallback.
    """
    spec = (spec or "auto").strip().lower()
    cuda_built = torch.backends.cuda.is_built() if hasattr(torch.backends, "cuda") else False
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if spec == "auto":
        if cuda_ok:
            return torch.device("cuda"), f"auto: CUDA GPU found ({torch.cuda.get_device_name(0)})"
        if mps_ok:
            return torch.device("mps"), "auto: no CUDA GPU; Apple MPS available"
        why = (
            "torch was built without CUDA (CPU-only build)"
            if not cuda_built
            else "torch has CUDA support but sees no usable GPU (driver missing or too old?)"
        )
        return torch.device("cpu"), f"auto: no GPU ({why})"
    if spec == "cpu":
        return torch.device("cpu"), "requested"
    if spec.startswith("cuda"):
        if not cuda_ok:
            raise ConfigError(
                f"--device {spec}: CUDA is not available ("
                + ("this torch build has no CUDA" if not cuda_built else "no GPU visible to torch")
                + ")",
                hint="use --device cpu, or install a CUDA build of torch matching your driver",
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device, f"requested ({torch.cuda.get_device_name(device.index or 0)})"
    if spec == "mps":
        if not mps_ok:
            raise ConfigError("--device mps: Apple MPS is not available on this machine/torch build")
        return torch.device("mps"), "requested"
    raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def configure_threads(num_threads: int) -> None:
    """Set torch's CPU thread count (0 keeps torch's default)."""
    if num_threads < 0:
        raise ConfigError("--num-threads must be 0 (default) or positive")
    if num_threads:
        torch.set_num_threads(num_threads)


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bfloat16 math natively, and how that was decided (in words).

    oneDNN also "supports" bfloat16 on plain AVX512 CPUs by emulation, which is slower than
    float32, so torch's own check is not enough: the CPU flags must name a bfloat16
    instruction set (x86: AVX512-BF16 or AMX-BF16; ARM: BF16). ``BUSEG_CPU_BF16=0`` or ``=1``
    overrides the detection (e.g. to compare both on one machine).
    """
    forced = os.environ.get("BUSEG_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"BUSEG_CPU_BF16={forced}"
    return native_bf16_from_flags(_cpu_flags())


def native_bf16_from_flags(flags: frozenset[str] | None) -> tuple[bool, str]:
    """The decision of :func:`cpu_native_bf16` for a set of CPU flags (None: unknown)."""
    if flags is None:
        return False, "CPU flags unknown on this system"
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "ARM BF16")):
        if flag in flags:
            return True, f"CPU has {name}"
    return False, "CPU has no native bfloat16 (AVX512-BF16/AMX/ARM BF16)"


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags: /proc/cpuinfo on Linux, sysctl on macOS; None where unknown."""
    try:
        flags = parse_cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        flags = frozenset()
    if flags:
        return flags
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return frozenset({"bf16"}) if out == "1" else frozenset()
    return None


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags of a /proc/cpuinfo text ('flags' on x86, 'Features' on ARM)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device`` (None = full precision).

    CUDA: bfloat16 where supported, else float16. CPU: bfloat16 where the CPU runs it
    natively (:func:`cpu_native_bf16`; about 2x faster there), else None: an emulated
    bfloat16 would be slower than float32. Other devices: None.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_native_bf16()[0]:
        return torch.bfloat16
    return None


def precision_description(device: torch.device, amp: bool) -> str:
    """The arithmetic a run uses on ``device``, and why, for the device line of a run."""
    if not amp:
        return "float32 (--no-amp)"
    dtype = autocast_dtype(device)
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return f"bfloat16 autocast ({why})" if native else f"float32 ({why})"
    if dtype is None:
        return f"float32 (no mixed precision on {device.type})"
    return f"{str(dtype).removeprefix('torch.')} autocast"
