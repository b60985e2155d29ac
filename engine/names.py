"""The names and rules every front end checks before anything heavy loads: no torch, no numpy, imported in ms.

Each rule lives here once, as a small function that returns the checked value or raises ValueError with one
line: the configs (``engine/config.py``), ``dh-run``, ``dh-export``, ``dh-serve``, the benchmarks and
training all ask it, so a bad flag is refused before torch is imported. The registries of what the names
run stay where the code is (``engine.sampling.SAMPLERS``: the step functions, checked against
``SAMPLERS`` here; ``engine.plan.PRESETS``: the preset configs; ``engine.schedule.SPACINGS``: the spacing
functions; ``engine.backends.base``: precision -> dtype).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class SamplerName(NamedTuple):
    """A sampler's name, how many ``x``-shaped state tensors its step keeps, and its help line."""

    name: str
    state: int
    help: str


SAMPLERS: dict[str, SamplerName] = {s.name: s for s in (
    SamplerName("ddpm", 0, "ancestral DDPM with learned variance (the authors' sampler)"),
    SamplerName("ddim", 0, "DDIM, deterministic at eta 0"),
    SamplerName("dpmpp_2m", 1, "DPM-Solver++(2M), deterministic, second order"),
    SamplerName("dpmpp_2m_sde", 1, "DPM-Solver++(2M) SDE, stochastic, second order"),
    SamplerName("unipc", 3, "UniPC-bh2 order 2 (2M predictor + UniC corrector), deterministic"),
)}
SPACINGS = ("uniform", "karras", "trailing")  # engine.schedule.SPACINGS holds the functions
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # engine.backends: which backend runs which
EXPORT_PRECISIONS = ("fp16", "fp32", "int8")  # what dh-export builds
TABLES = ("float64", "authors")
PRESETS = ("quality", "realtime")  # engine.plan.PRESETS holds what each names
FRAME_NOISE = ("fresh", "repeat")  # or a correlation strictly between 0 and 1, written as a number
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def check_choice(what: str, value, choices) -> str:
    """``value`` if it is one of ``choices``, else ValueError: ``<what> must be one of a, b, got 'x'``."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def check_spacing(spacing: str) -> str:
    return check_choice("spacing", spacing, SPACINGS)


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    return check_choice("precision", precision, choices)


def check_tables(tables: str, spacing: str = "uniform") -> str:
    """Step coefficient tables; ``authors`` reproduces the authors' sampler, which spaces steps uniformly."""
    check_choice("tables", tables, TABLES)
    if tables == "authors" and spacing != "uniform":
        raise ValueError("tables = authors reproduces the authors' sampler, which spaces steps uniformly; "
                         "use spacing uniform")
    return tables


def check_steps(steps: int, timesteps: int | None = None) -> int:
    """Respaced steps: at least 1, and at most the model's diffusion timesteps ``T`` where it is known."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if timesteps is not None and steps > timesteps:
        raise ValueError(f"steps must be at most {timesteps} (the model's diffusion timesteps), got {steps}")
    return steps


def check_warm_steps(warm_steps: int, steps: int) -> int:
    """Warm start: 0 (off) up to ``steps``."""
    if not 0 <= warm_steps <= steps:
        raise ValueError(f"warm steps must be in 0..steps ({steps}), got {warm_steps}")
    return warm_steps


def check_eta(eta: float) -> float:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    return eta


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    return seed


def noise_correlation(frame_noise: str) -> float:
    """The correlation between two frames' noise that ``frame_noise`` names: fresh 0, repeat 1, or the
    number it spells (strictly between 0 and 1). ValueError (one line) for anything else."""
    named = {"fresh": 0.0, "repeat": 1.0}
    if frame_noise in named:
        return named[frame_noise]
    try:
        corr = float(frame_noise)
    except (TypeError, ValueError):
        corr = float("nan")
    if not 0.0 < corr < 1.0:  # also refuses nan and inf
        raise ValueError(f"frame noise must be one of {', '.join(FRAME_NOISE)} or a correlation between 0 and 1 "
                         f"(e.g. 0.8), got {frame_noise!r}")
    return corr


def check_frame_noise(frame_noise: str) -> str:
    noise_correlation(frame_noise)
    return frame_noise


def flag_error(error: ValueError, flag: str) -> str:
    """A rule's message for a CLI flag: ``steps must be at least 1, got 0`` -> ``must be at least 1, got 0``
    (typer then prints ``Invalid value for --steps: ...``)."""
    text = str(error)
    for subject in ("frame noise ", "warm steps ", flag.removeprefix("--").replace("-", " ") + " ",
                    flag.removeprefix("--").replace("-", "_") + " "):
        if text.startswith(subject + "must"):
            return text.removeprefix(subject)
    return text


RULES = {"steps": check_steps, "sampler": check_sampler, "spacing": check_spacing, "frame_noise": check_frame_noise,
         "tables": check_tables, "eta": check_eta, "seed": check_seed, "preset": check_preset,
         "precision": check_precision}


def check_flags(**given) -> None:
    """Each given flag (None: not given) by its rule above; ValueError ``--<flag> must ...`` (one line), for a
    command that reports its own errors (dh-export, the benchmarks)."""
    for name, value in given.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            RULES[name](value)
        except ValueError as e:
            text = flag_error(e, flag)
            raise ValueError(f"{flag}: {text}" if text == str(e) else f"{flag} {text}") from None
