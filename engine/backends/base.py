"""The one backend seam: a Denoiser maps UNet inputs to its output (float32), whatever runs underneath.

The I/O specs (``TensorSpec``, ``BatchProfile``, ``unet_io_spec``) live in ``specs.py`` and are re-exported here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..config import PRECISIONS, ModelConfig
from ..specs import UNET_INPUTS, UNET_OUTPUTS, BatchProfile, TensorSpec, unet_io_spec  # noqa: F401  (re-exported)

# The one place a precision name (config.PRECISIONS) becomes a torch dtype.
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else BackendError (one line)."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """``"fp32" -> torch.float32``, ``"fp16" -> torch.float16``; BackendError for anything else (bf16 and int8
    run only on an exported engine: the openvino backend)."""
    if check_precision(precision) not in _DTYPES:
        raise BackendError(f"precision {precision} runs on an exported bundle with --backend openvino; "
                           f"PyTorch runs {' or '.join(_DTYPES)}")
    return _DTYPES[precision]


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as the one device a backend runs on: ``"cuda"`` becomes ``cuda:N`` (the current device) where
    torch sees a GPU, so nothing downstream has to decide it again."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def example_inputs(cfg: ModelConfig, batch: int = 1, *, device="cpu", dtype=torch.float32,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random valid inputs (images in [-1, 1], timesteps in 0..999) for export and parity checks."""
    inputs, _ = unet_io_spec(cfg)
    out = {}
    for spec in inputs:
        shape = spec.concrete(batch)
        if spec.name == "timesteps":
            t = torch.randint(0, 1000, shape, generator=generator).to(dtype)
        elif spec.name == "audio_emb":
            t = torch.randn(shape, generator=generator, dtype=dtype)
        else:
            t = torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1
        out[spec.name] = t.to(device)
    return out


class BackendError(RuntimeError):
    """A backend cannot run this engine here (wrong GPU, missing library, mismatched model)."""


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, timesteps, identity, motion_frames, audio_emb) -> model_out`` on ``device``.

    Shapes as ``unet_io_spec``. Inputs and output are torch tensors on ``self.device``, the output float32. A backend
    whose call has no host synchronisation sets ``graph_safe = True`` so the loop may capture it
    in a CUDA graph; the returned tensor may be a buffer the backend reuses on the next call.
    A backend that needs state of its own per captured graph (TensorRT: an execution context) also
    has ``for_graph() -> Denoiser``; the loop asks through :func:`graph_denoiser`. A backend whose
    batch sizes are bounded (a TensorRT plan's profile) has ``profile: BatchProfile``.
    """

    name: str
    device: torch.device
    config: ModelConfig
    graph_safe: bool

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor: ...


def graph_denoiser(denoiser: Denoiser) -> Denoiser:
    """What one new CUDA graph should capture: ``denoiser.for_graph()`` where the backend keeps state per
    graph (a TensorRT execution context), else ``denoiser`` itself."""
    make = getattr(denoiser, "for_graph", None)
    return make() if make is not None else denoiser


def check_batches(denoiser: Denoiser, largest: int, what: str) -> None:
    """BackendError (one line) unless ``denoiser`` runs every batch 1..``largest`` (``what`` names the setting
    asking for it, e.g. ``--max-streams 8``); a backend without a ``profile`` runs any batch."""
    profile = getattr(denoiser, "profile", None)
    if profile is None or (profile.min <= 1 and largest <= profile.max):
        return
    where = getattr(denoiser, "path", denoiser.name)
    raise BackendError(f"{where}: the engine was exported for batch {profile.min}..{profile.max} but {what} "
                       f"runs batches 1..{largest}; re-export with `dh-export --batch 1:1:{largest}` or lower it")
