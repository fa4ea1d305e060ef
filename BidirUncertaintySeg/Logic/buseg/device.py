"""Choosing the compute device, and saying why (users' first question when a GPU sits idle)."""

from __future__ import annotations

import torch

from .errors import ConfigError


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device`` (None = full precision): bfloat16 on CUDA where supported."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
