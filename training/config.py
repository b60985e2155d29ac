"""Training configuration: frozen dataclasses read from TOML (stdlib ``tomllib``).

A training config file has one table per dataclass::

    [model]      # engine ModelConfig (architecture; travels in the checkpoint)
    [diffusion]  # engine DiffusionConfig (T, schedule, default sampling steps)
    [data]       # DataConfig: how samples are drawn from the prepared clips
    [loss]       # LossConfig: lambda_vlb, lambda_lip, the lip box
    [optim]      # OptimConfig: optimizer, lr schedule, clipping, EMA
    [train]      # LoopConfig: steps, batch, precision, seeding, checkpoint/log/sample cadence

Missing keys take the dataclass defaults; unknown keys are an error (a typo never passes silently).
Presets ship as package data: ``crema`` and ``lrw`` (the paper's settings) and ``tiny`` (2 CPU cores).
``load_config("tiny", overrides=["optim.lr=1e-3"])`` applies dotted ``key=value`` overrides, the
value parsed as a TOML value (``1e-3``, ``true``, ``[1, 2]``, ``"first"``; bare words are strings).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dheads.engine.config import DiffusionConfig, ModelConfig, _from_dict, _to_dict, default_groups, norm_groups_problem

PRESETS = ("crema", "lrw", "tiny", "distill")


@dataclass(frozen=True)
class DataConfig:
    """How one training sample is drawn (paper Section 4.1).

    ``identity``: ``"random"`` (a frame of the same clip other than the target; the paper) or
    ``"first"`` (frame 0). Motion frames are the ``model.motion_frames`` ground-truth frames before
    the target (the identity frame where the clip has none), grayscale when
    ``model.grayscale_motion``. Audio window: embeddings ``i-w..i+w`` clamped to the clip.
    """

    identity: str = "random"
    num_workers: int = 0  # DataLoader worker processes per rank
    cache: str = "auto"  # memory (load every clip once) | mmap (read frames on demand) | auto
    speaker_balance: float = 0.0  # 0: every clip alike; 1: every speaker alike (dataset.speaker_balanced)
    # Augmentation (training/augment.py); all off by default = the paper's recipe.
    hflip: float = 0.0  # probability of mirroring a sample
    sample_color: float = 0.0  # max per-channel gain deviation (and 2x the max offset) of a sample's colour map
    motion_corrupt_prob: float = 0.0  # probability that a sample's motion frames are corrupted
    motion_noise: float = 0.0  # max std of the added Gaussian noise, levels of 255
    motion_blur: float = 0.0  # max Gaussian blur sigma, pixels at model.image_size
    motion_color: float = 0.0  # max per-channel colour offset, levels of 255
    motion_shade: float = 0.0  # max peak of a smooth local brightness field, levels of 255
    motion_rollout_prob: float = 0.0  # probability that a sample's motion frames come from the model's rollout
    motion_corrupt_ramp: int = 0  # steps over which the maxima ramp up from 0

    def __post_init__(self) -> None:
        _check_choice("data.identity", self.identity, ("random", "first"))
        _check_choice("data.cache", self.cache, ("auto", "memory", "mmap"))
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("hflip", "motion_corrupt_prob", "motion_rollout_prob", "speaker_balance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("motion_noise", "motion_blur", "motion_color", "motion_shade", "motion_corrupt_ramp"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.sample_color < 1.0:
            raise ValueError(f"data.sample_color must be in [0, 1), got {self.sample_color}")


@dataclass(frozen=True)
class LossConfig:
    """``L = L_simple + lambda_vlb L_vlb + lambda_lip L_lip`` (paper Section 4.4).

    ``lip_pad``: pixels added on each side of the lip landmarks' box, at ``lip_pad_at`` resolution
    (5 px at 128x128 in the paper), scaled to the model's ``image_size``. ``lip_frame``: whose
    landmarks give the box, ``"target"`` (the paper) or ``"identity"`` (the authors' code).
    """

    lambda_vlb: float = 1e-4
    lambda_lip: float = 0.2
    lip_pad: float = 5.0
    lip_pad_at: int = 128
    lip_frame: str = "target"
    # Ours, not the paper's: weight of the noise-DC loss (losses.dc_loss); 0 = the paper's recipe.
    lambda_dc: float = 0.0
    # The authors clamp the predicted x0 to [-1, 1] inside the VLB's posterior (their get_q_params).
    vlb_clip_x0: bool = True

    def __post_init__(self) -> None:
        _check_choice("loss.lip_frame", self.lip_frame, ("target", "identity"))
        if self.lambda_vlb < 0 or self.lambda_lip < 0 or self.lambda_dc < 0 or self.lip_pad < 0:
            raise ValueError("loss weights and lip_pad must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, gradient clipping and EMA (paper: Adam, lr 5e-5)."""

    optimizer: str = "adam"  # adam | adamw
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup, down to min_lr_ratio * lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(ema_decay, (1 + t) / (10 + t)): EMA useful early on

    def __post_init__(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, ("adam", "adamw"))
        _check_choice("optim.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class LoopConfig:
    """The training loop. ``batch_size`` is per process and per micro-batch; the effective batch is
    ``batch_size * grad_accum * world_size``."""

    steps: int = 1000
    batch_size: int = 10
    grad_accum: int = 1
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler; CUDA only)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # step_*.pt files kept besides last.pt; 0 keeps all
    log_every: int = 10
    log_backend: str = "csv"  # csv | tensorboard | both
    sample_every: int = 0  # write a sample video every N steps; 0 disables
    sample_frames: int = 8
    sample_steps: int = 20
    sample_sampler: str = "ddim"

    def __post_init__(self) -> None:
        _check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_choice("train.log_backend", self.log_backend, ("csv", "tensorboard", "both"))
        _check_choice("train.sample_sampler", self.sample_sampler, ("ddpm", "ddim"))
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run needs besides the data folder and the output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        problem = norm_groups_problem(self.model)
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Sections -> config. A ``[model]`` table without ``groups`` gets ``default_groups(model_channels)``
        (32 for the released widths, fewer for narrow models, so no GroupNorm is mean-blind)."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}; expected {sorted(sections)}")
        model = dict(data.get("model", {}))
        if "groups" not in model:
            model["groups"] = default_groups(int(model.get("model_channels", ModelConfig.model_channels)))
        kwargs = {}
        for name, f in sections.items():
            sub_cls = f.default_factory  # the dataclass itself
            kwargs[name] = _from_dict(sub_cls, model if name == "model" else dict(data.get(name, {})))
        return cls(**kwargs)

    def replace(self, **sections: Any) -> TrainingConfig:
        return dataclasses.replace(self, **sections)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def preset_path(name: str) -> Path:
    """Path of a shipped preset (``crema``, ``lrw``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give a .toml path")
    return Path(str(importlib.resources.files("dheads.training") / "presets" / f"{name}.toml"))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a config dict (a new dict is returned)."""
    out = {k: dict(v) for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        out.setdefault(section, {})[name] = _parse_value(value.strip())
    return out


def load_config(source: str | os.PathLike, overrides: list[str] | None = None) -> TrainingConfig:
    """A preset name or a TOML file, plus dotted overrides -> a validated TrainingConfig."""
    path = Path(source)
    if str(source) in PRESETS and not path.is_file():
        path = preset_path(str(source))
    if not path.is_file():
        raise FileNotFoundError(f"config {source}: no such preset or file (presets: {', '.join(PRESETS)})")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return TrainingConfig.from_dict(apply_overrides(data, list(overrides or [])))


def dumps_toml(cfg: TrainingConfig) -> str:
    """The config as TOML (what ``dh-train fit`` writes next to its checkpoints as ``config.toml``)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
