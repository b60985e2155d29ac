"""The sampling plan from the artifact: the authors' respacing rule, T from the DiffusionConfig, the
authors' float32 tables (bit for bit), log(beta) without a variance output, the library's defaults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import SMALL, DiffusionConfig, SamplerConfig
from dheads.engine.generate import FrameLoop, LoopConfig, generate_frames
from dheads.engine.model import random_unet
from dheads.engine.plan import default_sampler, make_plan
from dheads.engine.reference import generate_reference
from dheads.engine.sampling import ddpm_step
from dheads.engine.schedule import authors_float32_columns, cosine_schedule, respace, respaced_timesteps

from dheads.benchmarks.authors_loop import authors_frame


def _official(n: int) -> list[int]:
    """OFFICIAL_FACTS.md's rule, written out literally: a Python-float running sum, Python round."""
    stride = 999 / (n - 1)
    cur, out = 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur = cur + stride
    return out


def test_respacing_follows_the_running_sum_for_every_n():
    differs = 0
    for n in range(2, 1001):
        ts = respaced_timesteps(1000, n)
        assert ts == _official(n), n
        assert len(set(ts)) == n and ts[0] == 0 and ts[-1] == 999
        differs += ts != [round(k * (999 / (n - 1))) for k in range(n)]  # product rule, same stride
    assert differs == 278  # the count OFFICIAL_FACTS.md gives for the product rule's mismatches
    assert respaced_timesteps(1000, 21)[10] == 499  # the product rule gives 500
    for n in (10, 25, 50, 100, 200):
        assert respaced_timesteps(1000, n) == [round(k * (999 / (n - 1))) for k in range(n)]


def test_plan_uses_the_artifacts_num_timesteps():
    plan = make_plan(DiffusionConfig(num_timesteps=500, sampling_steps=10))
    assert plan.steps == 10 and plan.sampler == default_sampler(plan.diffusion)
    assert plan.schedule.timesteps.tolist() == respaced_timesteps(500, 10)
    assert plan.schedule.timesteps[-1] == 499
    np.testing.assert_allclose(plan.schedule.alphas_cumprod, cosine_schedule(500).alphas_cumprod[plan.schedule.timesteps])
    with pytest.raises(ValueError, match=r"^steps must be at most 500 \(the model's diffusion timesteps\), got 600$"):
        make_plan(DiffusionConfig(num_timesteps=500), SamplerConfig(steps=600))


def test_frame_loop_and_reference_sample_with_the_artifacts_T():
    model = random_unet(SMALL, std=0.05)
    d = DiffusionConfig(num_timesteps=500, sampling_steps=4, sampler="ddim")
    loop = FrameLoop(TorchDenoiser(model), LoopConfig(diffusion=d))
    assert loop.tables.timesteps.tolist() == [0, 166, 333, 499]
    g = torch.Generator().manual_seed(0)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 32, generator=g)
    ref = generate_reference(model, ident, audio, diffusion=d, seed=1)
    got = torch.cat(list(generate_frames(loop.denoiser, ident, audio, config=loop.config, loop=loop, seed=1)))
    assert torch.equal(got, ref)
    other = generate_reference(model, ident, audio, sampler=SamplerConfig("ddim", 4), seed=1)  # T = 1000
    assert not torch.allclose(other, ref)


def test_authors_float32_tables_differ_from_float64_as_documented():
    base = cosine_schedule()
    for n, key, rel in ((10, "sqrt_recip_alphas_cumprod", 0.17), (100, "log_betas", 1.3e-3)):
        f32, f64 = authors_float32_columns(base, n)[key], getattr(respace(base, n), key)
        assert np.max(np.abs(f32 - f64) / np.abs(f64)) == pytest.approx(rel, rel=0.05)


@pytest.mark.parametrize("n", [7, 21])
def test_authors_tables_reproduce_their_sampler_bit_for_bit(n):
    """0.0 difference: the engine's loop with tables='authors' vs the authors' loop on identical noise."""
    model = random_unet(SMALL, std=0.05)
    g = torch.Generator().manual_seed(2)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 32, generator=g)
    noise = torch.randn(1, n + 1, 1, 3, 32, 32, generator=g)
    sampler = SamplerConfig("ddpm", n, tables="authors")
    got = generate_reference(model, ident, audio, sampler=sampler, noise=noise)
    fast = next(generate_frames(TorchDenoiser(model), ident, audio, config=LoopConfig(sampler=sampler), noise=noise))
    window = audio[[0, 0, 0, 0, 0]][None]  # frame 0 of a 1-frame clip: every window index clamps to 0
    theirs = authors_frame(model, cosine_schedule(), n, ident, [ident, ident], window, noise[0, 0], noise=noise[0])
    assert (got - theirs).abs().max().item() == 0.0
    assert (fast - theirs).abs().max().item() == 0.0
    f64 = generate_reference(model, ident, audio, sampler=SamplerConfig("ddpm", n), noise=noise)
    assert (f64 - theirs).abs().max().item() > 0  # the float64 tables are a (slightly) different sampler


def test_ddpm_without_variance_output_uses_log_beta():
    s = respace(cosine_schedule(), 10)
    tables = make_plan(sampler=SamplerConfig("ddpm", 10)).tables(dtype=torch.float64)
    xt = torch.full((1, 3, 1, 1), 0.4, dtype=torch.float64)
    eps = torch.full((1, 3, 1, 1), 0.2, dtype=torch.float64)
    z = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    k = 5
    out = ddpm_step(xt, eps, tables, k, z)
    mean = ddpm_step(xt, eps, tables, k, None)
    assert (out - mean)[0, 0, 0, 0].item() == pytest.approx(math.exp(0.5 * math.log(s.betas[k])), rel=1e-12)


def test_library_defaults_to_the_artifacts_sampler():
    from dheads.engine.pipeline import Inputs, TalkingHead

    model = random_unet(SMALL, std=0.05)
    d = DiffusionConfig(sampling_steps=3, sampler="ddim")

    class Info:
        diffusion = d

    head = TalkingHead(TorchDenoiser(model), Info(), encoder=None)
    assert head.default_sampler == SamplerConfig("ddim", 3)
    inputs = Inputs(identity=torch.zeros(1, 3, 32, 32), samples=np.zeros(640), audio_emb=torch.randn(2, 32))
    frames = list(head.frames(inputs, seed=0))
    assert len(frames) == 2
    (cfg,) = head._loops
    assert cfg.sampler == SamplerConfig("ddim", 3) and cfg.diffusion == d
    assert head._loops[cfg].n_steps == 3


def test_karras_spacing_for_every_n():
    """Distinct ascending timesteps from 0 to T-1; below the start, the sigmas follow EDM's rho = 7 rule
    (uniform in sigma**(1/7), up to sigma 80) to within the rounding to whole timesteps."""
    import numpy as np

    from dheads.engine.schedule import KARRAS_SIGMA_MAX, cosine_schedule, karras_timesteps

    base = cosine_schedule()
    sigma = base.sqrt_recipm1_alphas_cumprod
    for n in range(1, 1001):
        ts = karras_timesteps(base, n)
        assert len(ts) == n and ts[-1] == 999 and (n == 1 or ts[0] == 0), n
        assert all(a < b for a, b in zip(ts, ts[1:])), n
    ts = karras_timesteps(base, 10)
    root = sigma[ts[:-1]] ** (1 / 7)
    want = np.linspace(sigma[0] ** (1 / 7), KARRAS_SIGMA_MAX ** (1 / 7), 9)
    assert np.allclose(root, want, rtol=0.03)  # one timestep is ~1-3% of sigma**(1/7) here
    assert ts == [0, 27, 164, 507, 802, 921, 965, 983, 991, 999]


def test_karras_plan_visits_its_timesteps_and_refuses_the_authors_tables():
    from dheads.engine.plan import make_plan
    from dheads.engine.schedule import cosine_schedule, karras_timesteps

    plan = make_plan(DiffusionConfig(), SamplerConfig("dpmpp_2m", 6, spacing="karras"))
    assert plan.schedule.timesteps.tolist() == karras_timesteps(cosine_schedule(), 6)
    with pytest.raises(ValueError, match=r"^spacing must be one of uniform, karras, trailing, got 'log'$"):
        SamplerConfig("ddpm", 10, spacing="log")
    with pytest.raises(ValueError, match="use spacing uniform"):
        SamplerConfig("ddpm", 10, tables="authors", spacing="karras")


def test_trailing_spacing_is_lin_et_al_rule_and_spends_no_call_at_t0():
    """Lin et al. 2024, Table 2: ``round(arange(T, 0, -T/n)) - 1``. The final step's x0 is the frame, taken
    from t = T/n - 1, where the uniform rule spends its last call at t = 0 (a UNet call on a clean frame)."""
    import numpy as np

    from dheads.engine.plan import make_plan
    from dheads.engine.schedule import cosine_schedule, trailing_timesteps

    base = cosine_schedule()
    assert trailing_timesteps(base, 4) == [249, 499, 749, 999]
    assert trailing_timesteps(base, 13) == [76, 153, 230, 307, 384, 461, 537, 614, 691, 768, 845, 922, 999]
    assert trailing_timesteps(base, 1) == [999] and trailing_timesteps(base, 1000) == list(range(1000))
    for n in range(1, 1001):
        ts = trailing_timesteps(base, n)
        assert len(ts) == n and ts[-1] == 999 and all(a < b for a, b in zip(ts, ts[1:])), n
        assert ts == sorted(np.round(np.arange(1000, 0, -1000 / n)).astype(int)[:n] - 1), n
    with pytest.raises(ValueError, match=r"^steps must be at least 1, got 0$"):
        trailing_timesteps(base, 0)
    plan = make_plan(DiffusionConfig(), SamplerConfig("ddpm", 4, spacing="trailing"))
    assert plan.schedule.timesteps.tolist() == [249, 499, 749, 999] and plan.calls() == 4
    # the respaced final step (k = 0) goes to abar = 1: its DDPM mean is the clamped x0 itself
    tables = plan.tables()
    assert tables.mean_coef_x0[0].item() == pytest.approx(1.0) and tables.mean_coef_xt[0].item() == pytest.approx(0.0)


def test_artifact_records_its_spacing():
    d = DiffusionConfig(sampling_steps=4, sampler="ddpm", frame_noise="0.9", spacing="trailing")
    assert default_sampler(d) == SamplerConfig("ddpm", 4, frame_noise="0.9", spacing="trailing")
    assert DiffusionConfig.from_dict(d.to_dict()) == d
    assert DiffusionConfig.from_dict({"num_timesteps": 1000, "schedule": "cosine", "sampling_steps": 25,
                                      "sampler": "ddpm"}).spacing == "uniform"  # older artifacts
    with pytest.raises(ValueError, match=r"^spacing must be one of uniform, karras, trailing, got 'leading'$"):
        DiffusionConfig(spacing="leading")


def test_artifact_records_its_frame_noise():
    d = DiffusionConfig(sampling_steps=5, sampler="ddpm", frame_noise="repeat")
    assert default_sampler(d) == SamplerConfig("ddpm", 5, frame_noise="repeat")
    assert DiffusionConfig.from_dict({"num_timesteps": 1000, "schedule": "cosine", "sampling_steps": 25,
                                      "sampler": "ddpm"}).frame_noise == "fresh"  # older artifacts


def test_realtime_preset_is_a_measured_row_of_the_committed_frontier():
    """The preset names a sampler and step count that the committed frontier measured, with fewer calls
    per frame than the demo's default, and within 25% of the default's F-MSE and OFM."""
    import json
    from pathlib import Path

    from dheads.engine.plan import preset_sampler

    rt = preset_sampler("realtime", DiffusionConfig())
    doc = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "frontier_demo.json").read_text())
    rows = {(r["sampler"], r["steps"], r["warm_steps"]): r for r in doc["rows"]}
    row, default = rows[(rt.name, rt.steps, rt.warm_steps)], rows[("ddpm", 25, 0)]
    assert row["calls_per_frame"] < default["calls_per_frame"]
    assert row["fmse"] <= 1.25 * default["fmse"] and row["ofm"] <= 1.25 * default["ofm"]
