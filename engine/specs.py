"""The I/O specs of the exported networks: what an artifact's tensors are, whoever reads them.

One spec per exported network (``unet_io_spec``) drives ONNX export, TensorRT profiles, buffer allocation,
the parity tests and the bundle's manifest (``engine/bundle.py`` records these values). Pure values: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

# Input order of the exported UNet; the names are the ONNX/TensorRT tensor names.
UNET_INPUTS = ("x_t", "timesteps", "identity", "motion_frames", "audio_emb")
UNET_OUTPUTS = ("model_out",)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape with ``-1`` for the batch axis, and dtype name of one network input/output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == -1 else d for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float32"))


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts: TensorRT's min/opt/max optimisation profile."""

    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def unet_io_spec(cfg: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of the UNet, batch axis ``-1``. Timesteps are float32 original t (0..999)."""
    s = cfg.image_size
    inputs = [
        TensorSpec("x_t", (-1, 3, s, s)),
        TensorSpec("timesteps", (-1,)),
        TensorSpec("identity", (-1, 3, s, s)),
        TensorSpec("motion_frames", (-1, cfg.motion_channels, s, s)),
        TensorSpec("audio_emb", (-1, cfg.audio_frames, cfg.audio_dim)),
    ]
    outputs = [TensorSpec("model_out", (-1, cfg.out_channels, s, s))]
    return inputs, outputs
