"""``dh-train distill`` on a tiny random-weight teacher in the released layout (TorchScript, 16x16 frames,
SDA-sized audio): the grids, the distillation targets against the engine's own sampler steps, resume, and
the student through the engine."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dheads.engine.bundle import sha256_file
from dheads.engine.checkpoint import load_checkpoint
from dheads.engine.config import AudioConfig, DiffusionConfig, ModelConfig, SamplerConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.plan import make_plan
from dheads.engine.sampling import ddim_step, ddpm_step
from dheads.engine.schedule import respaced_timesteps
from dheads.training import distill as D
from dheads.training.cli import main as dh_train
from dheads.training.config import load_config
from dheads.training.prepare import write_clip

SIZE, DIM = 16, 32
# The released layout (32 GroupNorm groups, divisor 512, dropout 0.1) at a width where groups hold 4 channels.
RELEASED_TINY = ModelConfig(image_size=SIZE, model_channels=128, channel_mult=(1,), num_res_blocks=1,
                            attention_levels=(0,), audio_dim=DIM)


def _inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    return dict(x=x, timesteps=torch.tensor([500] * batch), x_cond=x.flip(-1),
                motion_frames=torch.randn(batch, 6, SIZE, SIZE, generator=g),
                audio_emb=torch.randn(batch, 5, DIM, generator=g))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random-weight UNet of the released layout saved as the authors' TorchScript file."""
    torch.manual_seed(0)
    net = DiffusedHeadsUNet(RELEASED_TINY).eval()
    path = tmp_path_factory.mktemp("teacher") / "crema_script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, example_kwarg_inputs=_inputs()).save(str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A prepared folder (SDA-sized audio) without MediaPipe: two training clips and one test clip."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    index = []
    for k, split in enumerate(("train", "train", "test")):
        n = 8
        frames = rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)
        boxes = np.tile(np.array([[4, 10, 12, 14]], np.float32), (n, 1))
        emb = rng.standard_normal((n, DIM)).astype(np.float32)
        meta = {"id": f"c{k}", "n_frames": n}
        write_clip(root / "clips" / f"c{k}.npz", dict(frames=frames, mouth_boxes=boxes, face_found=np.ones(n, bool),
                                                      audio_emb=emb, meta=np.array(json.dumps(meta))))
        index.append({"id": f"c{k}", "speaker": f"s{k}", "split": split, "n_frames": n})
    audio = AudioConfig(encoder="sda", dim=DIM).to_dict()
    (root / "index.json").write_text(json.dumps({"audio": audio, "size": SIZE, "fps": 25, "clips": index}))
    return root


def _base(steps: int = 2, **over) -> "TrainingConfig":  # noqa: F821
    sets = {"train.steps": steps, "train.batch_size": 2, "train.checkpoint_every": 100, "train.log_every": 1, **over}
    return load_config("distill", [f"{k}={v}" for k, v in sets.items()])


# --------------------------------------------------------------------------- grids and targets (golden)

def test_round_grids_nest_and_end_on_the_engine_grid():
    grids = D.round_grids(1000, 4, 2)
    assert grids == [(respaced_timesteps(1000, 13), respaced_timesteps(1000, 7)),
                     (respaced_timesteps(1000, 7), [0, 333, 666, 999])]
    assert D.teacher_path(grids[1][0], 999, 666) == [999, 832]
    assert D.teacher_path(grids[1][0], 333, D.CLEAN) == [333, 166, 0]
    with pytest.raises(ValueError, match="too close to halve"):
        D.round_grids(8, 4, 3)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        D.DistillConfig(steps=1)


def test_a_finer_first_teacher_takes_four_or_eight_steps_per_student_step():
    sg = respaced_timesteps(1000, 13)
    (tg4, sg4), = D.round_grids(1000, 13, 1, teacher_substeps=4)
    assert sg4 == sg and len(tg4) == 49 and set(sg) <= set(tg4)
    assert all(len(D.teacher_path(tg4, hi, lo)) == 4 for lo, hi in zip(sg, sg[1:]))
    assert D.teacher_path(tg4, 0, D.CLEAN) == [0]  # the last segment has no finer steps below t = 0
    two = D.round_grids(1000, 4, 2, teacher_substeps=8)
    assert len(two[0][0]) == 49 and two[1] == D.round_grids(1000, 4, 2)[1]  # later rounds: a student teaches, 2 steps
    with pytest.raises(ValueError, match="--teacher-substeps must be 2, 4 or 8, got 3"):
        D.DistillConfig(teacher_substeps=3)


def _analytic(mu: torch.Tensor, abar_of):
    """The exact denoiser of data concentrated at ``mu``: eps = (x_t - sqrt(abar) mu) / sqrt(1 - abar)."""
    def model(x, t, identity, motion_frames=None, audio_emb=None):
        a = abar_of(t)
        return torch.cat([(x - a.sqrt() * mu) / (1 - a).sqrt(), torch.zeros_like(x)], dim=1)
    return model


def test_ddim_target_reproduces_two_engine_ddim_steps_in_one():
    """On an analytic denoiser: the student's one engine DDIM step with the distilled eps lands exactly where
    the engine's two DDIM steps of the finer grid land."""
    plan7 = make_plan(DiffusionConfig(), SamplerConfig("ddim", 7))
    plan4 = make_plan(DiffusionConfig(), SamplerConfig("ddim", 4))
    t7, t4 = plan7.tables(dtype=torch.float64), plan4.tables(dtype=torch.float64)
    abar_all = torch.tensor(plan7.base.alphas_cumprod)
    abar = lambda t: torch.cat([abar_all, abar_all.new_ones(1)])[torch.where(t < 0, 1000, t)].view(-1, 1, 1, 1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64).clamp(-1, 1)
    model = _analytic(mu * 0.9 + 0.05, abar)  # a denoiser that is not the data's: the target is not x0
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) * 0.6 + 0.3
    cond = {"identity": x, "motion": x, "audio": x}
    # the engine, 7-step grid: 666 -> 499.5 -> 333 is respaced indices 4 -> 3 -> 2
    x_t = 0.5 * x
    y = x_t
    for k in (4, 3):
        y = ddim_step(y, model(y, torch.tensor([int(t7.timesteps[k])]), x), t7, k, None)
    got = D.run_teacher(model, x_t, [[666, 500]], [333], abar, cond)
    torch.testing.assert_close(got, y, rtol=0, atol=1e-12)
    x0 = D.distill_x0(x_t, y, abar(torch.tensor([666])), abar(torch.tensor([333])))
    eps = D.eps_for_x0(x_t, x0, abar(torch.tensor([666])))
    one = ddim_step(x_t, torch.cat([eps, eps], 1), t4, 2, None)  # the student's step, 4-step grid index 2
    assert t4.timesteps[2] == 666 and t4.timesteps[1] == 333
    torch.testing.assert_close(one, y, rtol=0, atol=1e-9)
    # the last segment: t = 0 -> clean is the teacher's x0 itself
    last = D.run_teacher(model, x_t, [[0]], [D.CLEAN], abar, cond)
    torch.testing.assert_close(D.distill_x0(x_t, last, abar(torch.tensor([0])), abar(torch.tensor([-1]))), last)


def test_ddpm_step_matches_the_engine_and_its_target_inverts_the_mean():
    plan = make_plan(DiffusionConfig(), SamplerConfig("ddpm", 4))
    tab = plan.tables(dtype=torch.float64)
    abar_all = torch.tensor(plan.base.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x_t, x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.rand(2, 3, 4, 4, generator=g,
                                                                                        dtype=torch.float64) * 2 - 1
    v, z = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g,
                                                                                           dtype=torch.float64)
    a_t, a_s = abar_all[666].view(1, 1, 1, 1), abar_all[333].view(1, 1, 1, 1)
    eps = D.eps_for_x0(x_t, x0, a_t)
    want = ddpm_step(x_t, torch.cat([eps, v], 1), tab, 2, z)
    torch.testing.assert_close(D.ddpm_jump(x_t, x0, v, a_t, a_s, z), want, rtol=1e-9, atol=1e-9)
    mean = D.ddpm_jump(x_t, x0, v, a_t, a_s, torch.zeros_like(z))
    torch.testing.assert_close(D.ddpm_x0(x_t, mean, a_t, a_s), x0, rtol=1e-9, atol=1e-9)
    assert math.isclose(float(D.ddpm_coefs(a_t, a_s)[0]), float(tab.mean_coef_x0[2]), rel_tol=1e-12)


# --------------------------------------------------------------------------- end to end

def test_distill_torchscript_teacher_end_to_end_and_resume(teacher, data, tmp_path):
    dcfg = D.DistillConfig(steps=3, rounds=1)
    whole = D.distill(teacher, data, tmp_path / "whole", dcfg, _base(), progress=False)
    ckpt = load_checkpoint(whole.student)
    assert ckpt.source == "dheads"
    assert ckpt.diffusion == DiffusionConfig(sampling_steps=3, sampler="ddim")
    assert ckpt.model == RELEASED_TINY  # the TorchScript teacher's layout at the data's size
    assert ckpt.audio.encoder == "sda" and ckpt.audio.dim == DIM
    meta = ckpt.meta["distill"]
    assert meta["teacher_sha256"] == sha256_file(teacher) and meta["method"] == "progressive"
    assert meta["grid"] == [0, 500, 999] and meta["teacher_grid"] == [0, 250, 500, 750, 999]
    assert (meta["round"], meta["rounds"], meta["round_steps"], meta["round_teacher_steps"]) == (1, 1, 3, 5)
    assert (tmp_path / "whole" / "round_1" / "health.jsonl").is_file()
    # the student moved away from the teacher, and is finite
    t = load_checkpoint(teacher)
    moved = any(not torch.equal(v, t.state_dict[k]) for k, v in ckpt.state_dict.items())
    assert moved and all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    # paused after step 1 and resumed: the same weights as the uninterrupted run, bit for bit
    half = tmp_path / "half"
    D.distill(teacher, data, half, dcfg, _base(steps=1), progress=False)
    (half / "student.pt").unlink()
    resumed = D.distill(teacher, data, half, dcfg, _base(steps=2), progress=False)
    assert resumed.rounds[0].start_step == 1 and resumed.rounds[0].end_step == 2
    r = load_checkpoint(resumed.student)
    assert all(torch.equal(r.state_dict[k], v) for k, v in ckpt.state_dict.items())
    assert all(torch.equal(r.ema_state_dict[k], v) for k, v in ckpt.ema_state_dict.items())
    # the student runs through the engine at its recorded sampler and steps
    from dheads.engine.reference import generate_reference

    net = r.build()
    frames = generate_reference(net, torch.zeros(1, 3, SIZE, SIZE), torch.randn(4, DIM), diffusion=r.diffusion, seed=0)
    assert frames.shape == (4, 3, SIZE, SIZE) and torch.isfinite(frames).all()


def test_cli_distill_two_ddpm_rounds_and_a_foreign_folder(teacher, data, tmp_path):
    out = tmp_path / "s"
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "2",
            "--rounds", "2", "--sampler", "ddpm", "--rollout", "1", "--threads", "1", "--no-progress",
            "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=100"]
    with pytest.raises(SystemExit) as e:
        dh_train(args)
    assert e.value.code == 0
    first, last = load_checkpoint(out / "round_1" / "last.pt"), load_checkpoint(out / "student.pt")
    assert first.diffusion.sampling_steps == 3 and last.diffusion == DiffusionConfig(sampling_steps=2, sampler="ddpm")
    assert last.meta["distill"]["teacher_grid"] == [0, 500, 999] and last.meta["distill"]["sampler"] == "ddpm"
    assert last.meta["distill"]["teacher"] == str(teacher) and last.meta["distill"]["rollout"] == 1.0
    with pytest.raises(ValueError, match="another teacher, step count, grid, teacher path or method"):
        D.distill(teacher, data, out, D.DistillConfig(steps=3, rounds=2), _base(steps=1), progress=False)


def test_cli_distill_errors_are_one_line(teacher, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dh_train(["distill", "--teacher", str(tmp_path / "none.pt"), "--data", str(data), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"dh-train: error: {tmp_path / 'none.pt'}: no such file"
    with pytest.raises(SystemExit) as e:
        dh_train(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "o"),
                  "--steps", "1"])
    assert e.value.code == 2 and "--steps must be >= 2" in capsys.readouterr().err


def test_a_trailing_student_learns_from_its_teachers_own_grid():
    """``--spacing trailing --teacher-grid own``: the 4-step student's grid is Lin et al.'s 249..999 and its
    teacher (a 13-step uniform student) steps on its own grid between them, starting where x is."""
    own = respaced_timesteps(1000, 13)
    (tg, sg), = D.round_grids(1000, 4, 1, final=[249, 499, 749, 999], teacher_own=own)
    assert tg == own and sg == [249, 499, 749, 999]
    assert D.teacher_path(tg, 999, 749) == [999, 916, 832]  # on both grids: the teacher's own steps
    assert D.teacher_path(tg, 499, 249) == [499, 416, 333, 250]  # 499 is not on the teacher's grid
    assert D.teacher_path(tg, 249, D.CLEAN) == [249, 166, 83, 0]
    with pytest.raises(ValueError, match=r"^--spacing must be one of uniform, karras, trailing, got 'even'$"):
        D.DistillConfig(spacing="even")
    with pytest.raises(ValueError, match=r"^--teacher-grid must be refined or own, got 'fine'$"):
        D.DistillConfig(teacher_grid="fine")


def test_cli_distill_trailing_student_records_its_grid(teacher, data, tmp_path):
    out = tmp_path / "t"
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "2",
            "--rounds", "1", "--sampler", "ddpm", "--spacing", "trailing", "--teacher-grid", "own", "--rollout", "1",
            "--threads", "1", "--no-progress", "--set", "train.steps=1", "--set", "train.batch_size=2"]
    with pytest.raises(SystemExit) as e:
        dh_train(args)
    assert e.value.code == 0
    student = load_checkpoint(out / "student.pt")
    assert student.diffusion == DiffusionConfig(sampling_steps=2, sampler="ddpm", spacing="trailing")
    meta = student.meta["distill"]
    assert meta["grid"] == [499, 999] and meta["engine_grid"] and meta["spacing"] == "trailing"
    assert meta["teacher_grid_rule"] == "own"  # the option; "teacher_grid" holds the grid it chose
    assert meta["teacher_grid"] == respaced_timesteps(1000, 100)  # the TorchScript teacher samples DDPM 100
    assert make_plan(student.diffusion).schedule.timesteps.tolist() == [499, 999]  # what dh-run then samples
    with pytest.raises(ValueError, match="another teacher, step count, grid, teacher path or method"):
        D.distill(teacher, data, out, D.DistillConfig(steps=2, rounds=1, sampler="ddpm"), _base(steps=1),
                  progress=False)


def test_a_bundle_teacher_is_identified_by_its_onnx_weights(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "unet.onnx").write_bytes(b"weights")
    (bundle / "manifest.json").write_text("{}")
    single = tmp_path / "t.pt"
    single.write_bytes(b"weights")
    assert D.teacher_digest(bundle) == D.teacher_digest(single) == sha256_file(single)


# --------------------------------------------------------------------------- method dmd

def test_dmd_target_moves_against_fake_minus_real_scaled_by_the_distance():
    x0 = torch.tensor([[[[0.5, -0.5]]], [[[0.0, 0.2]]]])
    real = torch.tensor([[[[0.25, -0.25]]], [[[0.0, 0.2]]]])
    fake = torch.tensor([[[[0.75, -0.75]]], [[[0.1, 0.1]]]])
    target = D.dmd_target(x0, real, fake)
    # sample 0: mean |x0 - real| = 0.25, fake - real = (0.5, -0.5) -> step (2, -2)
    assert torch.allclose(target[0], torch.tensor([[[-1.5, 1.5]]]))
    # sample 1 sits on the teacher's answer: the normaliser's floor (1e-5) keeps it finite
    assert torch.allclose(target[1], x0[1] - torch.tensor([[[0.1, -0.1]]]) / 1e-5)
    # where the fake score agrees with the teacher, the loss has no gradient
    x = x0.clone().requires_grad_(True)
    (0.5 * ((x - D.dmd_target(x.detach(), real, real)) ** 2).mean()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"^--method dmd takes one round \(its real score is the teacher\), "
                                         r"got --rounds 2$"):
        D.DistillConfig(method="dmd", rounds=2)
    with pytest.raises(ValueError, match=r"^--method must be progressive or dmd, got 'gan'$"):
        D.DistillConfig(method="gan")


def test_cli_distill_dmd_trains_a_fake_score_and_resumes_bit_for_bit(teacher, data, tmp_path):
    def run(out: Path, steps: int) -> None:
        with pytest.raises(SystemExit) as e:
            dh_train(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "2",
                      "--rounds", "1", "--sampler", "ddpm", "--spacing", "trailing", "--method", "dmd",
                      "--dmd-weight", "0.5", "--fake-lr", "1e-3", "--threads", "1", "--no-progress",
                      "--set", f"train.steps={steps}", "--set", "train.batch_size=2", "--set", "train.log_every=1"])
        assert e.value.code == 0

    run(tmp_path / "whole", 2)
    student = load_checkpoint(tmp_path / "whole" / "student.pt")
    meta = student.meta["distill"]
    assert (meta["method"], meta["dmd_weight"], meta["regression_weight"], meta["fake_lr"]) == ("dmd", 0.5, 1.0, 1e-3)
    assert student.diffusion == DiffusionConfig(sampling_steps=2, sampler="ddpm", spacing="trailing")
    import csv

    with open(tmp_path / "whole" / "round_1" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["dmd"])) and float(r["fake_loss"]) > 0 for r in rows)
    assert float(rows[0]["dmd"]) == 0 < float(rows[1]["dmd"])  # the fake score starts as the teacher, then moves
    # the fake score moved off the teacher, and is saved with the run
    saved = torch.load(tmp_path / "whole" / "round_1" / "last.pt", weights_only=True)["extra"]["dmd_fake"]
    t = load_checkpoint(teacher)
    assert any(not torch.equal(v, t.state_dict[k]) for k, v in saved["state_dict"].items())
    # paused after step 1 and resumed: the student, its EMA and the fake score as in the uninterrupted run
    run(tmp_path / "half", 1)
    (tmp_path / "half" / "student.pt").unlink()
    run(tmp_path / "half", 2)
    resumed = load_checkpoint(tmp_path / "half" / "student.pt")
    assert all(torch.equal(resumed.state_dict[k], v) for k, v in student.state_dict.items())
    assert all(torch.equal(resumed.ema_state_dict[k], v) for k, v in student.ema_state_dict.items())
    again = torch.load(tmp_path / "half" / "round_1" / "last.pt", weights_only=True)["extra"]["dmd_fake"]
    assert all(torch.equal(again["state_dict"][k], v) for k, v in saved["state_dict"].items())
    # a progressive run cannot continue a dmd folder
    with pytest.raises(ValueError, match="another teacher, step count, grid, teacher path or method"):
        D.distill(teacher, data, tmp_path / "whole", D.DistillConfig(steps=2, rounds=1, sampler="ddpm",
                                                                     spacing="trailing"),
                  _base(steps=1), progress=False)


def test_dmd_under_torchrun_two_processes_on_cpu(teacher, data, tmp_path):
    """torchrun --nproc_per_node 2 with gloo: the student and the fake score both train under DDP."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000),
           "-m", "dheads.training.cli", "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
           "--steps", "2", "--rounds", "1", "--sampler", "ddpm", "--method", "dmd", "--fake-lr", "1e-3",
           "--no-progress", "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    student = load_checkpoint(out / "student.pt")
    assert student.meta["step"] == 2 and student.meta["distill"]["method"] == "dmd"
    rows = (out / "round_1" / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",dmd,fake_loss") and len(rows) == 3
    saved = torch.load(out / "round_1" / "last.pt", weights_only=True)["extra"]["dmd_fake"]
    t = load_checkpoint(teacher)
    assert any(not torch.equal(v, t.state_dict[k]) for k, v in saved["state_dict"].items())
