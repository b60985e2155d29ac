"""DPM-Solver++(2M) and UniPC (and DDIM) on analytic denoisers whose exact answer is known.

Gaussian data x0 ~ N(mu, s^2) per pixel: the exact denoiser is ``E[x0 | x_t] = mu + s^2 a (x_t - a mu) /
(a^2 s^2 + sigma^2)`` and the probability-flow ODE keeps ``z = (x_t - a mu) / sqrt(a^2 s^2 + sigma^2)``
constant, so the frame a deterministic solver should return is known in closed form. A point mass
(s = 0) is solved exactly, step by step, by every deterministic solver here.
"""

from __future__ import annotations

import pytest
import torch

from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import SMALL, DiffusionConfig, SamplerConfig
from dheads.engine.generate import LoopConfig, generate_frames
from dheads.engine.model import random_unet
from dheads.engine.plan import denoise_frame, make_plan, make_state
from dheads.engine.reference import generate_reference
from dheads.engine.sampling import SAMPLERS, sampler_help

MU = 0.3
DETERMINISTIC = ("ddim", "dpmpp_2m", "unipc")


def _gaussian_problem(name: str, n: int, s: float, trace: list | None = None):
    """``name``'s plan at ``n`` steps (float64 tables, no clamp), its abar, and the exact denoiser of
    x0 ~ N(MU, s^2) as an eps model ``model(x, k)`` (recording each call's state in ``trace``)."""
    plan = make_plan(DiffusionConfig(), SamplerConfig(name, n, clip_denoised=False))
    abar = torch.tensor(plan.schedule.alphas_cumprod, dtype=torch.float64)

    def model(x: torch.Tensor, k: int) -> torch.Tensor:
        if trace is not None:
            trace.append((k, x.clone()))
        a, sg = abar[k].sqrt(), (1 - abar[k]).sqrt()
        x0 = MU + s * s * a / (a * a * s * s + sg * sg) * (x - a * MU)
        return (x - a * x0) / sg

    return plan, plan.tables(dtype=torch.float64), abar, model


def _solve(name: str, n: int, s: float, trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Run ``name`` at ``n`` steps on the analytic denoiser; return (output, exact answer, plan)."""
    plan, tables, abar, model = _gaussian_problem(name, n, s, trace)
    x_T = torch.linspace(-2, 2, 27, dtype=torch.float64).view(1, 3, 3, 3)
    noise = torch.zeros(n + 1, 1, 3, 3, 3, dtype=torch.float64)
    out = denoise_frame(model, x_T.clone(), plan, tables, noise, make_state(plan.spec, x_T), n - 1)
    a_T, s_T = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    z = (x_T - a_T * MU) / torch.sqrt(a_T**2 * s * s + s_T**2)
    a0, s0 = abar[0].sqrt(), (1 - abar[0]).sqrt()
    return out, MU + s * s * a0 * z / torch.sqrt(a0**2 * s * s + s0**2), plan


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_point_mass_is_followed_exactly_at_every_step(name):
    trace: list = []
    out, _, plan = _solve(name, 9, 0.0, trace)
    abar = plan.schedule.alphas_cumprod
    x_T = trace[0][1]
    z = (x_T - abar[-1] ** 0.5 * MU) / (1 - abar[-1]) ** 0.5
    assert [k for k, _ in trace] == list(range(8, -1, -1))
    for k, x in trace:  # the state each model call sees is on the exact ODE path a_k mu + sigma_k z
        torch.testing.assert_close(x, abar[k] ** 0.5 * MU + (1 - abar[k]) ** 0.5 * z, rtol=0, atol=1e-9)
    torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-12)


# Max error vs the exact Gaussian answer (s = 0.5), float64, pinned from this implementation.
GOLDEN = {("ddim", 10): 1.578e-01, ("ddim", 40): 3.861e-02, ("dpmpp_2m", 10): 2.883e-01,
          ("dpmpp_2m", 40): 2.609e-02, ("unipc", 10): 3.075e-01, ("unipc", 40): 2.199e-02}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_gaussian_data_golden_errors(key):
    out, exact, _ = _solve(*key, 0.5)
    assert (out - exact).abs().max().item() == pytest.approx(GOLDEN[key], rel=2e-3)


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2), ("unipc", 2)])
def test_gaussian_data_convergence_order(name, order):
    """Halving the step size divides the error by about 2^order (measured between 40 and 80 steps)."""
    e40, e80 = ((lambda o: (o[0] - o[1]).abs().max().item())(_solve(name, n, 0.5)) for n in (40, 80))
    assert e40 / e80 == pytest.approx(2**order, rel=0.2) if order == 1 else e40 / e80 > 0.9 * 2**order
    if name != "ddim":
        e_ddim = (lambda o: (o[0] - o[1]).abs().max().item())(_solve("ddim", 80, 0.5))
        assert e80 < e_ddim / 2.5


def test_registry_is_the_one_source_of_names():
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
    assert all(name in sampler_help() for name in SAMPLERS)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"):
        SamplerConfig("euler")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_multistep_frame_loop_equals_reference_and_keeps_state_buffers(name):
    model = random_unet(SMALL, std=0.05)
    g = torch.Generator().manual_seed(4)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(3, 32, generator=g)
    sampler = SamplerConfig(name, 6)
    ref = generate_reference(model, ident, audio, sampler=sampler, seed=2)
    from dheads.engine.generate import FrameLoop

    loop = FrameLoop(TorchDenoiser(model), LoopConfig(sampler=sampler))
    ptrs = [s.data_ptr() for s in loop.state]
    assert len(ptrs) == SAMPLERS[name].state
    got = torch.cat(list(generate_frames(loop.denoiser, ident, audio, config=loop.config, loop=loop, seed=2)))
    assert torch.equal(got, ref)
    assert ptrs == [s.data_ptr() for s in loop.state]
    assert got.min() >= -1 and got.max() <= 1


def _sample_sde(name: str, n: int, s: float, seed: int = 0, trace: list | None = None) -> torch.Tensor:
    """``name`` at ``n`` steps on the Gaussian-data denoiser with random noise: 3 x 64 x 64 samples."""
    plan, tables, _, model = _gaussian_problem(name, n, s, trace)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n + 1, 1, 3, 64, 64, generator=g, dtype=torch.float64)
    x_T = noise[0].clone()
    return denoise_frame(model, x_T, plan, tables, noise, make_state(plan.spec, x_T), n - 1)


def test_sde_keeps_a_point_mass_on_its_marginals():
    """Point mass: every state the model sees is a_k mu + sigma_k w with w ~ N(0, 1) (the noise the SDE adds
    exactly replaces what it removes), and the frame is mu."""
    trace: list = []
    out = _sample_sde("dpmpp_2m_sde", 12, 0.0, trace=trace)
    abar = make_plan(DiffusionConfig(), SamplerConfig("dpmpp_2m_sde", 12)).schedule.alphas_cumprod
    for k, x in trace:
        w = (x - abar[k] ** 0.5 * MU) / (1 - abar[k]) ** 0.5
        assert abs(w.mean().item()) < 0.05 and w.std().item() == pytest.approx(1.0, abs=0.03), k
    torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-12)


def test_sde_samples_gaussian_data_with_its_mean_and_spread():
    """x0 ~ N(0.3, 0.5^2): the sampled frame's pixels converge to that mean and standard deviation as the
    steps grow (12,288 samples: the standard error of the std is 0.003). Measured std: 0.598 at 25 steps,
    0.535 at 50, 0.507 at 100, 0.502 at 200 (DDPM: 0.513, 0.513, 0.504, 0.502)."""
    stds = {n: _sample_sde("dpmpp_2m_sde", n, 0.5, seed=n).std().item() for n in (25, 50, 100, 200)}
    errs = [abs(stds[n] - 0.5) for n in (25, 50, 100)]
    assert errs[0] > errs[1] > errs[2] and abs(stds[200] - 0.5) < 0.01, stds
    assert _sample_sde("dpmpp_2m_sde", 200, 0.5, seed=1).mean().item() == pytest.approx(MU, abs=0.01)


def test_correlated_frame_noise_is_unit_gaussian_with_the_asked_correlation_and_reproducible():
    from dheads.engine.noise import SeededNoise, noise_correlation

    assert [noise_correlation(v) for v in ("fresh", "repeat", "0.8")] == [0.0, 1.0, 0.8]
    frames = torch.empty(6, 2, 1, 3, 32, 32)  # 6 frames of a [1 + 1 steps, B=1, 3, 32, 32] buffer
    fill = SeededNoise(11, corr=0.8)
    for i in range(len(frames)):
        fill(i, frames[i])
    flat = frames.reshape(6, -1)  # 6144 values a frame
    assert flat.mean().abs() < 0.02 and (flat.std(dim=1) - 1).abs().max() < 0.03  # each frame still N(0, 1)
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(6, dtype=torch.bool)]
    assert (off - 0.8).abs().max() < 0.03, off  # sampling error of a correlation over 6144 values: ~0.005
    again = torch.empty_like(frames)
    refill = SeededNoise(11, corr=0.8)
    for i in range(len(again)):
        refill(i, again[i])
    assert torch.equal(frames, again)
    with pytest.raises(ValueError, match=r"^noise correlation must be in \[0, 1\], got 1.2$"):
        SeededNoise(1, corr=1.2)


def test_repeated_frame_noise_gives_every_frame_the_same_noise_and_matches_the_reference():
    from dheads.engine.generate import FrameLoop
    from dheads.engine.noise import SeededNoise

    a, b = torch.empty(4, 1, 3, 8, 8), torch.empty(4, 1, 3, 8, 8)
    rep, fresh = SeededNoise(7, corr=1.0), SeededNoise(7)
    rep(0, a), rep(1, b)
    assert torch.equal(a, b)
    fresh(0, a), fresh(1, b)
    assert not torch.equal(a, b)
    for bad in ("same", "1.5", "0", "nan"):
        with pytest.raises(ValueError, match=r"^frame noise must be one of fresh, repeat or a correlation between "
                                             rf"0 and 1 \(e\.g\. 0\.8\), got '{bad}'$"):
            SamplerConfig("ddpm", 4, frame_noise=bad)

    model = random_unet(SMALL, std=0.05)
    g = torch.Generator().manual_seed(5)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 32, generator=g)
    sampler = SamplerConfig("ddpm", 3, frame_noise="repeat")
    ref = generate_reference(model, ident, audio, sampler=sampler, seed=2)
    loop = FrameLoop(TorchDenoiser(model), LoopConfig(sampler=sampler))
    got = torch.cat(list(generate_frames(loop.denoiser, ident, audio, config=loop.config, loop=loop, seed=2)))
    assert torch.equal(got, ref)
    other = generate_reference(model, ident, audio, sampler=SamplerConfig("ddpm", 3), seed=2)
    assert torch.equal(other[0], ref[0]) and not torch.equal(other[1:], ref[1:])  # frame 0 is shared
