"""engine/names.py: the one torch-free home of the names and rules every front end checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dheads.engine import names


def test_importing_names_and_configs_loads_neither_torch_nor_numpy():
    code = ("import sys, dheads.engine.names, dheads.engine.config; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_the_registries_take_their_names_from_here():
    from dheads.engine import config, noise, plan, sampling, schedule
    from dheads.engine.backends import base

    assert list(sampling.SAMPLERS) == list(names.SAMPLERS)
    for name, spec in sampling.SAMPLERS.items():
        assert (spec.state, spec.help) == (names.SAMPLERS[name].state, names.SAMPLERS[name].help)
    assert tuple(plan.PRESETS) == names.PRESETS
    assert tuple(schedule.SPACINGS) == names.SPACINGS
    assert config.PRECISIONS is names.PRECISIONS and base.PRECISIONS is names.PRECISIONS
    assert noise.noise_correlation is names.noise_correlation and noise.MAX_SEED == 2**64 - 1


@pytest.mark.parametrize("rule, args, line", [
    (names.check_sampler, ("euler",), "unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"),
    (names.check_preset, ("fast",), "unknown preset 'fast'; choose one of quality, realtime"),
    (names.check_spacing, ("log",), "spacing must be one of uniform, karras, trailing, got 'log'"),
    (names.check_precision, ("fp64",), "precision must be one of fp32, fp16, bf16, int8, got 'fp64'"),
    (names.check_precision, ("bf16", names.EXPORT_PRECISIONS), "precision must be one of fp16, fp32, int8, got 'bf16'"),
    (names.check_tables, ("f32",), "tables must be one of float64, authors, got 'f32'"),
    (names.check_tables, ("authors", "karras"), "tables = authors reproduces the authors' sampler, which spaces "
                                                "steps uniformly; use spacing uniform"),
    (names.check_steps, (0,), "steps must be at least 1, got 0"),
    (names.check_steps, (1001, 1000), "steps must be at most 1000 (the model's diffusion timesteps), got 1001"),
    (names.check_steps, (2.5,), "steps must be a whole number, got 2.5"),
    (names.check_warm_steps, (9, 8), "warm steps must be in 0..steps (8), got 9"),
    (names.check_eta, (float("nan"),), "eta must be a number >= 0, got nan"),
    (names.check_seed, (2**64,), f"seed must be in 0..2**64-1, got {2**64}"),
    (names.noise_correlation, ("1.0",), "frame noise must be one of fresh, repeat or a correlation between 0 and 1 "
                                        "(e.g. 0.8), got '1.0'"),
])
def test_each_rule_refuses_with_one_line(rule, args, line):
    with pytest.raises(ValueError) as e:
        rule(*args)
    assert str(e.value) == line


def test_rules_return_what_they_accept():
    assert names.check_steps(1000, 1000) == 1000 and names.check_warm_steps(0, 1) == 0
    assert [names.noise_correlation(v) for v in ("fresh", "repeat", "0.25")] == [0.0, 1.0, 0.25]
    assert names.check_tables("authors") == "authors" and names.check_seed(2**64 - 1) == 2**64 - 1


def test_check_flags_names_the_flag():
    names.check_flags(steps=None, spacing=None, frame_noise="fresh")  # None: not given
    for given, line in (({"steps": 0}, "--steps must be at least 1, got 0"),
                        ({"frame_noise": "2"}, "--frame-noise must be one of fresh, repeat or a correlation between "
                                               "0 and 1 (e.g. 0.8), got '2'"),
                        ({"sampler": "x"}, "--sampler: unknown sampler 'x'; choose one of ddpm, ddim, dpmpp_2m, "
                                           "dpmpp_2m_sde, unipc")):
        with pytest.raises(ValueError) as e:
            names.check_flags(**given)
        assert str(e.value) == line
