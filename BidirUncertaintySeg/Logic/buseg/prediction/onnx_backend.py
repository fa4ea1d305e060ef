"""ONNX Runtime as the prediction backend on CPUs without native bfloat16 (torch is the other).

On such a CPU torch runs float32, and ONNX Runtime runs the same float32 network - measured on a
shared CPU: 1.1-2.2x faster for the 3D V-Net, but 0.7-1.2x for the 2D U-Net, whose torch path
already folds BatchNorm and runs channels-last (benchmarks/results/inference_speed.md), and on a
CPU with AVX-512 but no BF16 (side by side, 1 thread) 1.01x at 128x128 and 0.85x at 256x256.
Where the CPU has bfloat16, torch's bfloat16 autocast is faster (1.6-2.9x), so ONNX Runtime is
only chosen automatically on the others, and there only for the networks it was measured to
run faster (:data:`ONNX_FASTER_THAN_TORCH`: the 3D ones).

* **Which backend** (:func:`choose_backend`): ``--engine torch`` or ``onnx`` as asked;
  ``auto`` takes ONNX Runtime when it is installed, the device is the CPU, mixed precision is
  on (``--no-amp`` means the float32 torch reference), and :func:`auto_cpu_backend` finds that
  the CPU has no native bfloat16, the network is one ONNX Runtime runs faster than torch
  float32 (3D) and the uncertainty measure is one ONNX Runtime runs (its entry in
  :mod:`buseg.catalogs.measures`). The reason goes to the run's device line and summary.
* **Uncertainty measures**: those whose catalog entry says ``onnx``: ``entropy`` and ``tta``
  (flips are applied around the exported network). ``mc-dropout`` needs random dropout at
  inference, which the exported inference graph does not have: it runs on the torch engine only.
* **Export** (:func:`onnx_forward`): the inference form of the network (BatchNorm folded
  into the convolutions, dropout off) with dynamic batch and spatial axes, through torch's
  TorchScript exporter (``dynamo=False``: it needs the ``onnx`` package but not
  ``onnxscript``, takes 2 s instead of 17 s, and the torch.export path fails on the V-Net's
  dynamic sizes). Exported once per model file and cached beside it (``model.pt`` ->
  ``model.onnx`` and ``model.onnx.json`` with the SHA-256 of the weights it came from and the
  SHA-256 of the export itself; a changed model is exported again). An export is run only when
  the bytes read from the file - the very bytes given to ONNX Runtime - have the sidecar's
  SHA-256 and the sidecar has the loaded weights' SHA-256: another model's ``model.onnx`` put
  beside the model, or an export and a sidecar of two models paired by predictions that raced
  while the model file was replaced, are exported again, never run. Both files are written
  atomically (temporary file, rename). Where that folder is not writable, or a ``model.onnx``
  there is not ours (no sidecar), the cache is the user cache folder; where that fails too,
  the export is kept in memory. The cache never makes a prediction fail.
* **Out of memory** in ONNX Runtime (``std::bad_alloc``, a failed allocation) is the same
  out-of-memory error as torch's: the batch is halved and retried, then a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from buseg.catalogs.measures import measure, measure_names
from buseg.errors import BusegError, ConfigError, ModelFileError

BACKENDS = ("auto", "torch", "onnx")
EXPORT_SCHEMA = "buseg-onnx-export"
# Raise when the exported graph or the sidecar changes (folding, opset, names, the export's own SHA-256
# in the sidecar since format 2): older caches are then re-exported.
EXPORT_FORMAT = 2
OPSET = 17
INSTALL_HINT = "install it with: pip install 'buseg[onnx]' (onnxruntime and onnx), or use --engine torch"
_SESSIONS: OrderedDict[tuple[str, int], Any] = OrderedDict()  # (weights digest, threads) -> session
_SESSIONS_KEPT = 2


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when it cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def onnx_measure_names() -> tuple[str, ...]:
    """The uncertainty measures the ONNX Runtime backend runs (their catalog entries say ``onnx``)."""
    return tuple(name for name in measure_names() if measure(name).onnx)


# Whether ONNX Runtime float32 runs the network of a dimension faster than torch float32 on a CPU
# without native bfloat16, and the measurement that says so (docs/inference.md, benchmarks/results/
# inference_speed*.md): only where it does, ``auto`` picks it.
ONNX_FASTER_THAN_TORCH: dict[str, tuple[bool, str]] = {
    "2d": (
        False,
        "ONNX Runtime is no faster than torch float32 for 2D networks (U-Net measured at 0.85-1.01x "
        "on AVX-512 without BF16, 0.73-1.22x elsewhere: torch's 2D path folds BatchNorm and runs channels-last)",
    ),
    "3d": (True, "ONNX Runtime float32 ran the 3D V-Net 1.1-2.2x faster than torch float32"),
}


def choose_backend(
    requested: str, device: torch.device, uncertainty: str, amp: bool, dimension: str
) -> tuple[str, str]:
    """The backend ('torch' or 'onnx') for a run of a ``dimension`` ('2d'/'3d') network and why, in words;
    an impossible request is a ConfigError."""
    from buseg.device import cpu_native_bf16

    if requested == "torch":
        return "torch", "--engine torch"
    if requested == "onnx":
        if onnxruntime_version() is None:
            raise ConfigError("--engine onnx: onnxruntime is not installed", hint=INSTALL_HINT)
        if device.type != "cpu":
            raise ConfigError(
                f"--engine onnx runs on the CPU only, not on {device}",
                hint="use --device cpu or --engine torch",
            )
        if not measure(uncertainty).onnx:
            raise ConfigError(
                f"--engine onnx cannot run --uncertainty {uncertainty}: the exported network has no dropout "
                "at inference",
                hint=f"use --engine torch, or --uncertainty {' or '.join(onnx_measure_names())}",
            )
        return "onnx", "--engine onnx"
    if requested != "auto":
        raise ConfigError(f"--engine must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if device.type != "cpu":
        return "torch", f"auto: ONNX Runtime is used on the CPU only, this run is on {device.type}"
    if not amp:
        return "torch", "auto: --no-amp runs the float32 torch reference"
    native_bf16 = cpu_native_bf16()
    if not native_bf16[0] and os.environ.get("BUSEG_ONNX", "").strip() == "0":
        return "torch", "auto: BUSEG_ONNX=0"
    return auto_cpu_backend(native_bf16, dimension, uncertainty, onnxruntime_version())


def auto_cpu_backend(
    native_bf16: tuple[bool, str], dimension: str, uncertainty: str, onnx_version: str | None
) -> tuple[str, str]:
    """``--engine auto`` on the CPU with mixed precision on: the backend and why, from whether the CPU
    has native bfloat16 (:func:`buseg.device.cpu_native_bf16`: the answer and its reason), the
    network's dimension, the uncertainty measure and the installed onnxruntime's version (None: none)."""
    native, cpu = native_bf16
    if native:
        return "torch", f"auto: {cpu}, where bfloat16 torch is the fastest"
    faster, measured = ONNX_FASTER_THAN_TORCH[dimension]
    if not faster:
        return "torch", f"auto: {cpu}; {measured}, so torch float32 runs it"
    if onnx_version is None:
        return "torch", f"auto: {cpu}; onnxruntime is not installed (pip install 'buseg[onnx]': {measured})"
    if not measure(uncertainty).onnx:
        return "torch", f"auto: {uncertainty} needs dropout at inference, which only the torch engine runs"
    return "onnx", f"auto: {cpu}; {measured}, so ONNX Runtime {onnx_version} runs it"


def backend_description(engine: str, reason: str, device: torch.device, amp: bool) -> str:
    """The backend and arithmetic of a prediction run, for its device line and summary."""
    from buseg.device import precision_description

    if engine == "onnx":
        return f"float32 ONNX Runtime {onnxruntime_version()} ({reason})"
    return f"{precision_description(device, amp)}, torch engine ({reason})"


def weights_sha256(network: nn.Module) -> str:
    """SHA-256 over the network's tensors (names, dtypes, shapes, bytes): what an export is checked against."""
    digest = hashlib.sha256(f"buseg-onnx-{EXPORT_FORMAT}".encode())
    for name, tensor in network.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class _KnownDigest:
    """A network's weights digest and the tensors it was computed from (detached, sharing their memory)."""

    tensors: dict[str, torch.Tensor]
    versions: dict[str, int]
    digest: str

    def still_fits(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` holds the very tensors hashed, none changed in place since."""
        return state.keys() == self.tensors.keys() and all(
            _memory_layout(tensor) == _memory_layout(self.tensors[name])
            and tensor._version == self.versions[name]
            for name, tensor in state.items()
        )


def _memory_layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


# Hashing every weight (megabytes) was done for every predicted case, only to find the session: the
# digest is kept per network and reused while the network holds the same tensors at the same version.
# Torch bumps a tensor's version on each in-place change (optimizer step, load_state_dict, BatchNorm
# statistics); a tensor replaced (``param.data = ...``) lies in other memory, since the tensors kept
# here keep the hashed memory from being reused. Writes that bypass torch (a numpy view) are not seen.
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, _KnownDigest] = weakref.WeakKeyDictionary()


def network_weights_sha256(network: nn.Module) -> str:
    """:func:`weights_sha256` of ``network``, hashed again only when its weights changed since the last call."""
    state = network.state_dict()
    known = _DIGESTS.get(network)
    if known is not None and known.still_fits(state):
        return known.digest
    # Versions read before hashing: a change made while hashing makes the next call hash again.
    versions = {name: tensor._version for name, tensor in state.items()}
    digest = weights_sha256(network)
    # Inference tensors (made under torch.inference_mode) have no version counter: never reused.
    if not any(tensor.is_inference() for tensor in state.values()):
        _DIGESTS[network] = _KnownDigest(dict(state), versions, digest)
    return digest


def user_cache_folder() -> Path:
    """Where exports go when the model's folder cannot take them: $XDG_CACHE_HOME or ~/.cache, /buseg/onnx."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "buseg" / "onnx"


def cache_locations(model_path: str | Path | None, digest: str) -> list[Path]:
    """Where an export of ``model_path`` may be cached, first choice first."""
    places = []
    if model_path:
        places.append(Path(model_path).with_suffix(".onnx"))
    places.append(user_cache_folder() / f"{digest[:32]}.onnx")
    return places


def _sidecar(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".json")


def _read_sidecar(onnx_path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(_sidecar(onnx_path).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) and document.get("schema") == EXPORT_SCHEMA else None


def _cached_export(place: Path, digest: str) -> bytes | None:
    """The cached export at ``place`` if its sidecar says it was made from these weights and the bytes
    read are the export the sidecar describes (checked on the bytes returned, which are the ones run:
    a file replaced between reading the sidecar and the export cannot slip through)."""
    document = _read_sidecar(place)
    if (
        document is None
        or document.get("weights_sha256") != digest
        or document.get("format") != EXPORT_FORMAT
    ):
        return None
    try:
        data = place.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == document.get("onnx_sha256") else None


def _store_export(place: Path, data: bytes, digest: str, model_path: str | Path | None) -> bool:
    """Write an export and its sidecar at ``place``; False (and nothing half-written) where that fails.

    A file beside the model without our sidecar is someone else's and is never replaced (in the user
    cache folder every file is ours: one left without its sidecar by an interrupted run is replaced).
    """
    from buseg.files.safe_files import write_bytes_atomic, write_json_atomic

    ours = place.parent == user_cache_folder() or _read_sidecar(place) is not None
    if place.exists() and not ours:
        return False
    document = {
        "schema": EXPORT_SCHEMA,
        "format": EXPORT_FORMAT,
        "weights_sha256": digest,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "model_file": Path(model_path).name if model_path else None,
        "torch": torch.__version__,
        "opset": OPSET,
    }
    try:
        write_bytes_atomic(place, data, overwrite=True)
        write_json_atomic(_sidecar(place), document, overwrite=True)
    except (BusegError, OSError):
        with contextlib.suppress(OSError):
            _sidecar(place).unlink()  # an export without a matching sidecar is never used
        return False
    return True


def export_onnx(network: nn.Module, dimension: str, in_channels: int) -> bytes:
    """The ONNX model (bytes) of an inference-form ``network``: input 'image', output 'logits', float32,
    dynamic batch and spatial axes. An export failure is a ModelFileError in one line."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; checked here for a clear message
    except ImportError:
        raise ConfigError(
            "exporting to ONNX needs the onnx package, which is not installed", hint=INSTALL_HINT
        ) from None
    spatial = 2 if dimension == "2d" else 3
    axes = {0: "batch", **{2 + i: f"size{i}" for i in range(spatial)}}
    sample = torch.zeros((1, in_channels, *(32,) * spatial))  # any size divisible by 16 traces the same graph
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
            torch.onnx.export(
                network,
                (sample,),
                buffer,
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": axes, "logits": axes},
                opset_version=OPSET,
            )
    except Exception as exc:  # any exporter failure: one line, the exporter's first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(
            f"exporting the network to ONNX failed: {first}", hint="use --engine torch"
        ) from None
    return buffer.getvalue()


def _session(data: bytes, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory arena: it kept ~0.9 GB more than torch at the peak of a 512x512x300 prediction (3.26 vs
    # 2.36 GB) and holds it after the run; without it the U-Net pass was 3-10% slower (measured).
    options.enable_cpu_mem_arena = False
    # Fatal messages only: ORT's warnings are about its own graph rewrites, and its errors come back as
    # exceptions, which are said in one line (an out-of-memory error retried with a smaller batch is no
    # reason to print ORT's log line).
    options.log_severity_level = 4
    try:
        return onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a corrupt export: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"ONNX Runtime cannot load the exported network: {first}") from None


def load_session(
    network: nn.Module,
    inference_form: Callable[[], nn.Module],
    dimension: str,
    model_path: str | Path | None,
) -> tuple[Any, str]:
    """An ONNX Runtime session of ``network`` and where its export came from ('cached at ...', 'exported ...').

    ``inference_form`` makes the network to export (called only when no cached export fits).
    Sessions of the last two models are kept in this process, so repeated cases reuse them (found by
    the weights' digest, itself hashed once per network and weights).
    """
    digest = network_weights_sha256(network)
    threads = torch.get_num_threads()
    key = (digest, threads)
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key], "loaded earlier in this process"
    places = cache_locations(model_path, digest)
    data, origin = None, ""
    for place in places:
        data = _cached_export(place, digest)
        if data is not None:
            origin = f"cached at {place}"
            break
    if data is None:
        data = export_onnx(inference_form(), dimension, int(getattr(network, "in_channels", 1)))
        stored = next((place for place in places if _store_export(place, data, digest, model_path)), None)
        origin = f"exported to {stored}" if stored else "exported (kept in memory: no writable cache folder)"
    session = _session(data, threads)
    _SESSIONS[key] = session
    while len(_SESSIONS) > _SESSIONS_KEPT:
        _SESSIONS.popitem(last=False)
    return session, origin


def session_forward(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch -> float32 logits function running ``session`` (inputs and outputs are CPU tensors)."""
    input_name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            (logits,) = session.run(None, {input_name: array})
        except Exception as exc:  # ORT's own exception types are not RuntimeError (and MemoryError)
            if _is_allocation_failure(exc):
                raise RuntimeError(f"out of memory in ONNX Runtime: {_last_words(exc)}") from None
            raise
        return torch.from_numpy(logits)

    return forward


# What ONNX Runtime says when an allocation fails (std::bad_alloc with the arena off, the arena's words
# with it on); pybind11 turns a bare std::bad_alloc into MemoryError.
_ALLOCATION_FAILURES = ("bad_alloc", "failed to allocate memory", "out of memory")


def _is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(words in text for words in _ALLOCATION_FAILURES)


def _last_words(exc: BaseException) -> str:
    """The end of ORT's message (the node that failed and why), in one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[-160:]
