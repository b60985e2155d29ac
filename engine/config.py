"""Frozen, typed configuration values that travel inside every artifact (checkpoint, ONNX bundle, plan).

Each config is a frozen dataclass with ``to_dict``/``from_dict`` so it round-trips through JSON
manifests and ``torch.save`` checkpoints without pickling classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar


from . import names
from .names import PRECISIONS, SPACINGS, TABLES  # noqa: F401  (re-exported: the names live in engine/names.py)

T = TypeVar("T")


def _to_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v.to_dict() if dataclasses.is_dataclass(v) else v
    return out


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)``; ``cls.READS`` names keys older artifacts wrote that its constructor still takes."""
    known = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "READS", ()))
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the Diffused Heads UNet (defaults = the released CREMA checkpoint).

    Input channels are ``[x_t (3) | motion frames oldest..newest | identity (3)]``.
    """

    image_size: int = 128
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 3)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)  # level index; level l works at image_size / 2**l
    num_head_channels: int = 64
    dropout: float = 0.1
    motion_frames: int = 2
    grayscale_motion: bool = False
    audio_window: int = 2  # frames each side of the current one -> 2*w+1 embeddings
    audio_dim: int = 256
    learn_sigma: bool = True
    time_embed_divisor: int = 512  # the authors' non-standard frequency divisor (not model_channels/2)
    groups: int = 32
    # "identity": each frame's mean colour is the identity frame's (engine/model/anchor.py). Ours only;
    # the released model has none.
    color_anchor: str = "none"
    # (x0, y0, x1, y1), fractions of the frame: blanked in every motion frame so the mouth must follow the
    # audio (engine/model/motion_mask.py). Ours only; () = none, as released.
    motion_mask: tuple[float, ...] = ()
    # Width of the mask's soft edge, a fraction of the frame: the box fades in over this width, centred on its
    # edges, so no hard seam can be learned from it. 0 = a hard box (models before 2026-12-07).
    motion_mask_feather: float = 0.0

    @property
    def motion_channels(self) -> int:
        return self.motion_frames * (1 if self.grayscale_motion else 3)

    @property
    def in_channels(self) -> int:
        return 3 + self.motion_channels + 3

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    @property
    def audio_frames(self) -> int:
        return 2 * self.audio_window + 1

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


# GroupNorm over fewer channels than this erases the spatial mean (the colour) of what it normalises:
# with one channel per group every norm layer is an InstanceNorm, and the UNet cannot predict the
# mean of the noise, so its frames' colour flickers (see training/health.py).
MIN_CHANNELS_PER_GROUP = 4
MAX_GROUPS = 32


def norm_groups_problem(cfg: ModelConfig) -> str | None:
    """Why ``cfg``'s GroupNorm layers cannot carry colour, or None when they can.

    The narrowest normalised layer has ``model_channels`` channels (every level is a multiple of it).
    """
    c, g = cfg.model_channels, cfg.groups
    if g < 1 or c % g:
        return f"model.groups = {g} does not divide model.model_channels = {c}"
    if c // g < MIN_CHANNELS_PER_GROUP:
        return (f"model.groups = {g} with model_channels = {c} gives {c // g} channel(s) per GroupNorm group, "
                f"which erases each channel's mean (the frame's colour); use model.groups = {default_groups(c)} "
                f"(at least {MIN_CHANNELS_PER_GROUP} channels per group)")
    return None


def default_groups(channels: int) -> int:
    """The most groups (at most 32) that divide ``channels`` with at least 4 channels each (1 if none)."""
    best = 1
    for g in range(1, MAX_GROUPS + 1):
        if channels % g == 0 and channels // g >= MIN_CHANNELS_PER_GROUP:
            best = g
    return best


CREMA = ModelConfig()
LRW = ModelConfig(grayscale_motion=True)
# Built by the same code as the full model; fast enough for CPU tests.
SMALL = ModelConfig(
    image_size=32,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(2,),
    audio_dim=32,
)


@dataclass(frozen=True)
class AudioConfig:
    """Which audio encoder a model was trained with, and its per-frame output.

    ``encoder`` is ``"sda"`` (the authors' encoder, 256-d) or ``"whisper"`` (our trainable stack).
    A model is never fed features from an encoder other than the one recorded here.
    """

    encoder: str = "sda"
    dim: int = 256
    sample_rate: int = 16000
    fps: int = 25
    # Encoder-specific settings, e.g. {"model": "tiny.en"} for Whisper.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class SamplerConfig:
    """How frames are sampled: a sampler of ``engine.sampling.SAMPLERS``, its respaced ``steps`` and options.

    ``tables``: ``float64`` (default) or ``authors`` (their float32 tables, to reproduce their sampler bit
    for bit). ``warm_steps``: 0 = off; else every frame after the first starts from the previous frame
    noised to the ``warm_steps``-th respaced step and runs only those ``warm_steps`` model calls.
    ``spacing``: which timesteps the ``steps`` are: ``uniform`` (the authors' rule), ``karras``
    (EDM's rho = 7 placement, denser at low noise) or ``trailing`` (Lin et al. 2024: T-1 down to T/n - 1,
    no call spent at t = 0; what few-step students are trained on). ``frame_noise``: ``fresh`` (each frame draws new
    noise, the authors' way), ``repeat`` (every frame reuses frame 0's x_T and step noise, so frames
    differ only where their conditioning does), or a correlation between 0 and 1 such as ``"0.8"``
    (``engine/noise.py``: each frame's noise still N(0, I), correlated 0.8 with every other frame's).
    Every value is checked by the rules of ``engine/names.py`` (no torch needed).
    """

    name: str = "ddpm"
    steps: int = 100
    eta: float = 0.0
    clip_denoised: bool = True
    tables: str = "float64"
    warm_steps: int = 0
    spacing: str = "uniform"
    frame_noise: str = "fresh"

    def __post_init__(self) -> None:
        names.check_sampler(self.name)
        names.check_steps(self.steps)
        names.check_eta(self.eta)
        names.check_warm_steps(self.warm_steps, self.steps)
        names.check_spacing(self.spacing)
        names.check_tables(self.tables, self.spacing)
        names.check_frame_noise(self.frame_noise)

    def override(self, **given: Any) -> SamplerConfig:
        """This config with the fields a user chose; a value of None keeps this one's. The one merge behind
        every front end (dh-run's flags, dh-serve's request fields, the benchmarks, training's rollouts), so a
        client that sets only ``steps`` keeps the sampler, spacing, frame noise and warm start. ValueError (one
        line) for an unknown field or a value the rules refuse. (More steps than a model's diffusion timesteps:
        ``names.check_steps(steps, T)``, which ``plan.make_plan`` applies.)"""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(k for k in given if k not in fields)
        if unknown:
            raise ValueError(f"unknown sampler setting {unknown[0]!r}; known: {', '.join(sorted(fields))}")
        chosen = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(self, **chosen) if chosen else self

    @property
    def noise_corr(self) -> float:
        """The correlation between two frames' noise that ``frame_noise`` names (0 fresh, 1 repeat)."""
        return names.noise_correlation(self.frame_noise)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True, init=False)
class DiffusionConfig:
    """The diffusion process: the training schedule, and ``sampling``: the artifact's default
    :class:`SamplerConfig` (what dh-run, dh-serve and the library sample with when the user chooses nothing;
    a few-step student's records the grid it learned).

    Written as ``{"num_timesteps", "schedule", "sampling": {...}}``. Older artifacts (manifests, checkpoints,
    training TOML) wrote the default as loose ``sampler``/``sampling_steps``/``frame_noise``/``spacing`` keys:
    the constructor (and so ``from_dict``) still takes those and folds them into ``sampling``; the same names
    read back as read-only views of it.
    """

    num_timesteps: int = 1000
    schedule: str = "cosine"
    sampling: SamplerConfig = SamplerConfig()

    READS = ("sampler", "sampling_steps", "frame_noise", "spacing")  # older artifacts' keys

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine",
                 sampling: SamplerConfig | dict[str, Any] | None = None, *, sampler: str | None = None,
                 sampling_steps: int | None = None, frame_noise: str | None = None, spacing: str | None = None):
        if isinstance(sampling, dict):
            sampling = SamplerConfig.from_dict(sampling)
        sampling = (sampling or SamplerConfig()).override(name=sampler, steps=sampling_steps, frame_noise=frame_noise,
                                                           spacing=spacing)
        object.__setattr__(self, "num_timesteps", num_timesteps)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "sampling", sampling)
        names.check_steps(sampling.steps, num_timesteps)

    # Older code's spelling, read-only (new code reads ``sampling``).
    sampler = property(lambda self: self.sampling.name)
    sampling_steps = property(lambda self: self.sampling.steps)
    frame_noise = property(lambda self: self.sampling.frame_noise)
    spacing = property(lambda self: self.sampling.spacing)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        return _from_dict(cls, data)


# The precisions an engine computes in (engine/names.py PRECISIONS; engine/backends/base.py turns a name into a
# torch dtype; which backend runs which: engine/backends/__init__.py BACKEND_PRECISIONS). bf16 and int8 run on
# the OpenVINO backend (int8 also on ONNX Runtime), from the bundle's ONNX: bf16 from unet.onnx, int8 from
# unet_int8.onnx.


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how an engine runs, never what it computes: the one value ``dh-run``'s flags become and
    ``TalkingHead.open`` hands to the backends (checked here, once, before anything loads).

    ``backend`` None: chosen from the artifact (``engine.backends.open_denoiser`` checks the name against its
    registry). ``device``: ``auto | cpu | cuda | cuda:N``. ``threads`` None: auto (``engine/threads.py``).
    ``audio_encoder``: a file for models whose encoder is not bundled (the authors' ``audio_encoder.pt``).
    """

    backend: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    cuda_graph: bool = True
    audio_encoder: str | None = None

    def __post_init__(self) -> None:
        names.check_precision(self.precision)
        dev = str(self.device)
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be None (auto) or a positive count, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        return _from_dict(cls, data)
