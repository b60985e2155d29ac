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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dheads.engine import names
from dheads.engine.config import DiffusionConfig, ModelConfig, _from_dict, _to_dict, default_groups, norm_groups_problem

PRESETS = ("crema", "lrw", "tiny", "distill")
# What a training step computes in (autocast): the engine's precisions but int8, which only an exported
# engine runs (engine/names.py holds the names).
TRAIN_PRECISIONS = tuple(p for p in names.PRECISIONS if p != "int8")


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
    reframe: float = 0.0  # probability that a sample is zoomed and shifted (other framings)
    reframe_scale: float = 0.0  # max relative zoom deviation of a reframed sample
    reframe_shift: float = 0.0  # max shift of a reframed sample along each axis, fraction of the side

    def __post_init__(self) -> None:
        _check_choice("data.identity", self.identity, ("random", "first"))
        _check_choice("data.cache", self.cache, ("auto", "memory", "mmap"))
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("hflip", "motion_corrupt_prob", "motion_rollout_prob", "speaker_balance", "reframe"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("motion_noise", "motion_blur", "motion_color", "motion_shade", "motion_corrupt_ramp"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("reframe_scale", "reframe_shift"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"data.{name} must be in [0, 0.5), got {getattr(self, name)}")
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
    precision: str = "fp32"  # TRAIN_PRECISIONS: fp32 | fp16 | bf16 (autocast; fp16 adds a GradScaler; CUDA only)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # step_*.pt files kept besides last.pt; 0 keeps all
    log_every: int = 10
    log_backend: str = "csv"  # csv | tensorboard | both
    sample_every: int = 0  # write a sample video every N steps; 0 disables
    sample_frames: int = 8
    sample_steps: int = 20
    sample_sampler: str = "ddim"  # any engine sampler (engine/names.py SAMPLERS)

    def __post_init__(self) -> None:
        names.check_choice("train.precision", self.precision, TRAIN_PRECISIONS)
        _check_choice("train.log_backend", self.log_backend, ("csv", "tensorboard", "both"))
        try:
            names.check_sampler(self.sample_sampler)
        except ValueError as e:
            raise ValueError(f"train.sample_sampler: {e}") from None
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


def _split(item: str) -> tuple[str, str, str]:
    """``"section.key=value"`` -> ``(section, key, value text)``; ValueError for anything else."""
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    return section, name.strip(), value.strip()


def _field_type(section: str, name: str) -> Any:
    """The annotated type of ``[section] name`` in :class:`TrainingConfig`, or None where there is none
    (an unknown section or key, which ``TrainingConfig.from_dict`` refuses with its own message)."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(TrainingConfig)}
    if section not in sections:
        return None
    return typing.get_type_hints(sections[section]).get(name)


def _type_problem(tp: Any, value: Any) -> str | None:
    """What ``value`` (parsed TOML) should have been to fit type ``tp``, or None when it fits."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        problems = [_type_problem(a, value) for a in options]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if origin in (tuple, list):
        if not isinstance(value, list):
            return "a list, e.g. [1, 2]"
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            return f"a list of {len(args)} values"
        elem = args if fixed else (args[:1] * len(value))
        for a, v in zip(elem, value):
            problem = _type_problem(a, v)
            if problem:
                return f"a list of {problem.removeprefix('a ').removeprefix('an ')}s" if not fixed else \
                    f"a list of {len(args)} values, each {problem}"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(value, dict) else "a table, e.g. {a = 1}"
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a config dict (a new dict is returned). Each value must fit
    its field's type (``--set optim.lr=abc`` is refused here, with the key, the value and the type)."""
    out = {k: dict(v) for k, v in data.items()}
    for item in overrides:
        section, name, text = _split(item)
        value = _parse_value(text)
        tp = _field_type(section, name)
        problem = _type_problem(tp, value) if tp is not None else None
        if problem:
            raise ValueError(f"--set {section}.{name}={text}: {section}.{name} takes {problem}, got {value!r}")
        out.setdefault(section, {})[name] = value
    return out


# What a resumed run may change (``--set`` on resume): how long it runs and how often it writes, never what
# it learns (model, diffusion, data, loss, optimiser, batch, seed, precision).
RESUME_KEYS = frozenset({"train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                         "train.log_backend", "train.sample_every", "train.sample_frames", "train.sample_steps",
                         "train.sample_sampler", "data.num_workers", "data.cache"})


def _flat(cfg: TrainingConfig) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()}


def _shown(value: Any) -> str:
    """A config value as TOML writes it, where TOML can (None cannot: shown as Python does)."""
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)


def resumed_config(recorded: dict[str, Any], overrides: list[str] | None = None, *,
                   given: TrainingConfig | None = None, where: str = "the run") -> TrainingConfig:
    """The config a resumed run continues with: the one it recorded (``recorded``, the checkpoint's), so a
    resume never silently becomes another run. ``overrides`` (``--set``) may change the ``RESUME_KEYS``
    (e.g. ``train.steps``, to lengthen the run; the change is recorded); ``given`` (a ``--config`` named on
    resume, its ``--set`` applied) must otherwise be the recorded config. ValueError (one line) naming
    each key that would change otherwise."""
    base = TrainingConfig.from_dict(recorded)
    target = given if given is not None else TrainingConfig.from_dict(apply_overrides(recorded, list(overrides or [])))
    named = {f"{section}.{name}" for section, name, _ in map(_split, overrides or [])}
    old, new = _flat(base), _flat(target)
    refused = [k for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not (k in RESUME_KEYS and k in named)]
    if refused:
        flag = "--config" if given is not None else "--set"
        shown = ", ".join(f"{k} = {_shown(old.get(k))} recorded, {_shown(new.get(k))} given" for k in refused)
        raise ValueError(f"resuming {where}: {flag} changes its recorded config ({shown}); a resumed run keeps "
                         f"the config it was started with (--set may change only {', '.join(sorted(RESUME_KEYS))}): "
                         "drop the flag, or start a new run with another --out")
    return target


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
