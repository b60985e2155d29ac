"""``dh-train distill``: progressive distillation (Salimans & Ho 2022) of any teacher into a few-step student.

Each round halves the steps: the student starts as a copy of its teacher and learns to make, in ONE
step from t_k to t_{k-1} of its grid, what the teacher makes in TWO steps (t_k -> midpoint -> t_{k-1}) of
a grid twice as fine; the next round's teacher is this round's student. The grids are nested and
anchored on the engine's own respaced timesteps for the final step count
(``engine.schedule.respaced_timesteps(T, K)``): round r's teacher grid is its student grid plus the
midpoints, so the last student runs on exactly the timesteps ``dh-run`` samples with, and the rounds'
grids come out as the engine's respacing for 2K-1, 4K-3, ... steps (13 -> 7 -> 4 for K = 4, 2 rounds).

Which timesteps (``DistillConfig.spacing``, recorded in the student's artifact as its default): ``uniform``
(the authors' rule, as above) or ``trailing`` (Lin et al. 2024: 249, 499, 749, 999 for 4 steps). The
uniform rule spends a few-step student's last call at t = 0, on an already clean frame, and makes the
call before it jump to clean from T/(n-1); trailing ends at T/n - 1, so every call denoises (on the demo
model, untrained, 4 trailing steps score F-MSE 22.9 where 4 uniform ones score 161.8). ``teacher_grid``
``own`` makes round 1's teacher step on the grid it samples on by default (a 13-step student on its 13
steps) instead of the student grid refined: a teacher path then starts at the student's timestep and
takes the teacher's own steps below it, however many lie before the next student step.

Two samplers (``DistillConfig.sampler``; the student's artifact records it with its step count):

* ``ddim`` (Salimans & Ho): deterministic teacher steps; the target is the x0 whose DDIM step from x_k
  lands exactly on the teacher's two-step sample (their Eq. 8), clamped to [-1, 1] as the engine clamps.
* ``ddpm``: ancestral teacher steps (learned-range variance); the target is the x0 whose DDPM posterior
  mean from x_k is the teacher's two-step sample, the last of its steps taken at its mean (the same
  expectation, less variance): regressed on, the student's one-step mean learns the teacher's two-step
  mean and the engine's DDPM step adds the noise. For teachers that sample well only with DDPM.

The student keeps the teacher's architecture and its eps output (the engine, the exporter and the
frame loop run it unchanged); each round is a :class:`~dheads.training.train.Trainer` run whose objective
is swapped (``DistillTrainer._micro``), so resume, DDP, EMA, progress lines and the model-health check are
the trainer's. Per sample (a frame with its identity, motion frames and audio, drawn, mirrored and
motion-corrupted exactly as ``dh-train fit`` draws them):

* a trainable segment k of the student grid and the input: ``x_k = q_sample(x0, t_k)`` (plain
  progressive distillation), or, with probability ``rollout`` where t_k > 0, the student's OWN step (no grad) from
  ``q_sample(x0, t_{k+1})`` to t_k, the teacher then stepping from ``q_sample(x0, t_{k+1})`` over both
  segments: the student learns to correct its own previous step (what it meets when sampling);
* the loss: the MSE between the student's eps and the eps that gives the target x0, weighted
  ``max(1, 1/SNR_k)`` (Salimans & Ho's truncated-SNR weight on the x error), plus the same inside the
  lip box times ``loss.lambda_lip``. The variance output is not trained (it is the teacher's).

``method = "dmd"`` (one round) adds distribution matching (Yin et al. 2024, DMD; DMD2's two-model form):
the regression above keeps the student on the teacher's path, but a regression on a stochastic teacher
learns the MEAN of its outcomes, and a mean over the teacher's mouth shapes is a mouth that moves less.
So a second model, the fake score (a copy of the teacher), is trained alongside with the plain
diffusion loss on the frames the student makes (its x0 at each trained step); the student's x0 is
noised to a random t in [0.02 T, 0.98 T] and pushed along ``teacher x0 - fake x0`` there
(``dmd_target``): toward where the teacher's distribution, given the same identity, motion frames and
audio, has more mass than the student's. ``dmd_weight`` and ``regression_weight`` weigh the two terms;
``fake_lr`` is the fake score's rate (it must keep up with the student). The fake score and its optimizer
are saved with each checkpoint (``extra["dmd_fake"]``), so a run resumes bit for bit. Cost: a teacher and
a fake call on the noised frame and the fake score's own step (forward and backward) on top of a
progressive step: about twice one on the demo model with the teacher's own grid.

The top step (t = T-1) is never a trained segment: there SNR is ~2e-9, so an eps model's x0 is
``sqrt(1/abar - 1) = 2e4`` times its eps error, clamped; no eps model can carry an image across that step
(the engine's grid starts there whatever the step count), which is why the ``rollout`` samples exist:
the student learns to start its first real step from what its top step actually leaves.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dheads.engine.bundle import UNET_ONNX, sha256_file
from dheads.engine.checkpoint import Checkpoint, load_checkpoint
from dheads.engine.names import check_choice, SPACINGS as SCHEDULE_SPACINGS
from dheads.engine.config import DiffusionConfig
from dheads.engine.plan import make_plan
from dheads.engine.schedule import SPACINGS as SPACING_FNS
from dheads.engine.schedule import respaced_timesteps, schedule_for

from .config import TrainingConfig
from .dataset import ClipStore
from .diffusion import mean_flat, q_sample
from .losses import box_mask, masked_mse
from .train import FitResult, Trainer, _atomic_link, make_optimizer

log = logging.getLogger(__name__)

CLEAN = -1  # the "timestep" after t = 0: the clean sample (abar = 1)


@dataclass(frozen=True)
class DistillConfig:
    """What a distillation does: the final step count, the halving rounds, and the objective's options."""

    steps: int = 4  # the final student's sampling steps (UNet calls per frame)
    rounds: int = 2  # halvings: the first teacher runs (steps - 1) * 2**rounds + 1 steps
    rollout: float = 0.5  # fraction of samples whose input is the student's own previous step
    sampler: str = "ddim"  # the teacher's steps and the student's: ddim (Salimans & Ho) or ddpm (stochastic)
    method: str = "progressive"
    teacher_substeps: int = 2  # the first round's teacher steps per student step (2, 4, 8: 2 = Salimans & Ho)
    spacing: str = "uniform"  # the final student's timesteps (engine SPACINGS), recorded as its default
    teacher_grid: str = "refined"  # round 1's teacher path: the student grid refined, or the teacher's "own"
    dmd_weight: float = 1.0  # method dmd: the distribution-matching term's weight
    regression_weight: float = 1.0  # method dmd: the progressive regression term's weight (0: DMD alone)
    fake_lr: float = 0.0  # method dmd: the fake-score model's learning rate (0: optim.lr)

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2 (the engine's first step, at t = T-1, cannot carry an image), "
                             f"got {self.steps}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0.0 <= self.rollout <= 1.0:
            raise ValueError(f"rollout must be in [0, 1], got {self.rollout}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be ddim or ddpm, got {self.sampler!r}")
        if self.method not in ("progressive", "dmd"):
            raise ValueError(f"--method must be progressive or dmd, got {self.method!r}")
        if self.method == "dmd" and self.rounds != 1:
            raise ValueError(f"--method dmd takes one round (its real score is the teacher), got --rounds {self.rounds}")
        if self.dmd_weight < 0 or self.regression_weight < 0 or self.fake_lr < 0:
            raise ValueError("--dmd-weight, --regression-weight and --fake-lr must be >= 0")
        if self.teacher_substeps not in (2, 4, 8):
            raise ValueError(f"--teacher-substeps must be 2, 4 or 8, got {self.teacher_substeps}")
        check_choice("--spacing", self.spacing, SCHEDULE_SPACINGS)
        if self.teacher_grid not in ("refined", "own"):
            raise ValueError(f"--teacher-grid must be refined or own, got {self.teacher_grid!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- grids (pure)

def refine(grid: list[int]) -> list[int]:
    """The grid with the midpoint ``round((a + b) / 2)`` of each neighbouring pair added (ascending)."""
    mids = [round((a + b) / 2) for a, b in zip(grid, grid[1:])]
    if any(m in (a, b) for m, a, b in zip(mids, grid, grid[1:])):
        raise ValueError(f"timesteps {grid} are too close to halve again; use fewer rounds")
    return sorted(grid + mids)


def round_grids(num_timesteps: int, steps: int, rounds: int, teacher_substeps: int = 2, *,
                final: list[int] | None = None, teacher_own: list[int] | None = None
                ) -> list[tuple[list[int], list[int]]]:
    """``(teacher_grid, student_grid)`` of each round, first round first; ascending original timesteps.

    The last student grid is ``final`` (default: the engine's ``respaced_timesteps(T, steps)``); each earlier
    one is the next one refined, so every teacher step pair lands exactly on a student step.
    ``teacher_substeps`` (2, 4, 8): the FIRST round's teacher grid is its student grid refined log2 of that
    many times, so the original teacher takes that many steps per student step (a finer, more accurate
    teacher path; later rounds' teachers are students, which sample well only on their own grid, so they
    take two). ``teacher_own``: the first round's teacher grid instead (the grid the teacher samples on, e.g.
    a 13-step student's own): its steps between two student steps make each target, however many they are.
    """
    grids = [list(final) if final is not None else respaced_timesteps(num_timesteps, steps)]
    for _ in range(rounds):
        grids.insert(0, refine(grids[0]))
    pairs = list(zip(grids[:-1], grids[1:]))
    first_teacher = pairs[0][0]
    for _ in range(teacher_substeps.bit_length() - 2):  # 2 -> 0 more refinements, 4 -> 1, 8 -> 2
        first_teacher = refine(first_teacher)
    pairs[0] = (sorted(teacher_own) if teacher_own is not None else first_teacher, pairs[0][1])
    return pairs


def teacher_path(teacher_grid: list[int], t_hi: int, t_lo: int) -> list[int]:
    """The teacher's model-call timesteps going from ``t_hi`` down to ``t_lo`` (exclusive; CLEAN = -1): ``t_hi``
    itself (where x is; a student timestep need not be on the teacher's own grid), then the grid's below it."""
    return [t_hi] + [t for t in sorted(teacher_grid, reverse=True) if t_lo < t < t_hi]


# --------------------------------------------------------------------------- DDIM algebra (pure)
# The engine's equations (engine/sampling.py: predict_x0, ddim_step, ddpm_step), written per sample from abar:
# distillation steps a batch whose samples sit at different timesteps, between any two timesteps of a teacher
# grid (and to the clean sample), while the engine's steps read coefficients precomputed in float64 for one
# plan's grid at a respaced index k. The same equation rounds differently in float32 that way (x0 at t = 666:
# 59% of values differ by up to 1 ulp), so calling the engine's steps would change every progressive run's
# targets; tests/test_distill.py checks these against the engine's steps in float64 (to 1e-9 or better).

def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), clamped to [-1, 1] (the engine's ``predict_x0``)."""
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddim_jump(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from t to s < t: ``sqrt(abar_s) x0 + sqrt(1 - abar_s) (x_t - sqrt(abar_t) x0)
    / sqrt(1 - abar_t)`` (the engine's ``ddim_step`` with its eps re-derived from the clamped x0)."""
    eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps


def distill_x0(x_t: torch.Tensor, x_s: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM step from ``x_t`` lands on ``x_s`` (Salimans & Ho Eq. 8); ``x_s`` itself at s = clean."""
    ratio = ((1 - abar_s) / (1 - abar_t)).sqrt()  # sigma_s / sigma_t
    return (x_s - ratio * x_t) / (abar_s.sqrt() - ratio * abar_t.sqrt())


def eps_for_x0(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The eps output whose x0 (``x0_from_eps``) is ``x0``."""
    return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()


def ddpm_coefs(abar_t: torch.Tensor, abar_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coef_x0, coef_xt, log_beta, log_beta_tilde)`` of the respaced DDPM step t -> s (Ho et al. Eq. 6-7 with
    ``beta = 1 - abar_t / abar_s``); ``log_beta_tilde`` is floored where s is clean (no noise is added there)."""
    beta = 1 - abar_t / abar_s
    coef_x0 = beta * abar_s.sqrt() / (1 - abar_t)
    coef_xt = (1 - abar_s) * (1 - beta).sqrt() / (1 - abar_t)
    tilde = (beta * (1 - abar_s) / (1 - abar_t)).clamp(min=1e-20)
    return coef_x0, coef_xt, beta.log(), tilde.log()


def ddpm_jump(x_t: torch.Tensor, x0: torch.Tensor, v: torch.Tensor | None, abar_t: torch.Tensor,
              abar_s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Ancestral DDPM step t -> s with learned-range variance ``nu log beta + (1 - nu) log beta_tilde``,
    ``nu = (v + 1) / 2`` (log beta without ``v``), no noise where s is clean (the engine's ``ddpm_step``)."""
    c0, ct, log_beta, log_tilde = ddpm_coefs(abar_t, abar_s)
    mean = c0 * x0 + ct * x_t
    logvar = log_beta if v is None else (v + 1) * 0.5 * log_beta + (1 - v) * 0.5 * log_tilde
    return mean + torch.where(abar_s < 1, torch.exp(0.5 * logvar), torch.zeros_like(logvar)) * z


def ddpm_x0(x_t: torch.Tensor, x_s: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDPM posterior mean from ``x_t`` is ``x_s``: regressed on samples ``x_s`` of the teacher's
    two stochastic steps, the student's mean learns theirs."""
    c0, ct, _, _ = ddpm_coefs(abar_t, abar_s)
    return (x_s - ct * x_t) / c0


def dmd_target(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Where distribution matching moves a generated frame ``x0``: against ``fake_x0 - real_x0`` (the fake
    score's denoised frame minus the teacher's, at the same noisy input), divided per sample by the mean
    ``|x0 - real_x0|`` (DMD's normaliser: the step is about as large as the sample is far from the teacher's
    answer). ``0.5 * mean((x0 - target)^2)`` then has that direction as its gradient."""
    norm = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp(min=1e-5)
    return x0 - (fake_x0 - real_x0) / norm


def run_teacher(model, x: torch.Tensor, paths: list[list[int]], ends: list[int], abar, cond: dict,
                sampler: str = "ddim", generator: torch.Generator | None = None, final_noise: bool = True
                ) -> torch.Tensor:
    """Each sample i of ``x`` [B, 3, H, W] stepped through ``paths[i]`` (descending timesteps) to ``ends[i]``
    by ``sampler`` (``ddim``, or ``ddpm`` with its noise drawn from ``generator`` on the CPU).

    ``final_noise=False``: a path's last DDPM step returns its mean, which is that step's expectation (its
    noise is added linearly), so a regression target built from it keeps its mean and loses that variance.

    ``model(x_t, t, identity, motion_frames=, audio_emb=)``; ``abar(t)``: [b] int64 -> [b, 1, 1, 1].
    Samples still on their path share one model call per step.
    """
    x = x.clone()
    for j in range(max((len(p) for p in paths), default=0)):
        idx = [i for i, p in enumerate(paths) if len(p) > j]
        sel = torch.tensor(idx, device=x.device)
        t = torch.tensor([paths[i][j] for i in idx], device=x.device)
        s = torch.tensor([paths[i][j + 1] if j + 1 < len(paths[i]) else ends[i] for i in idx], device=x.device)
        out = model(x[sel], t, cond["identity"][sel], motion_frames=cond["motion"][sel],
                    audio_emb=cond["audio"][sel]).to(x.dtype)
        x0 = x0_from_eps(x[sel], out[:, :3], abar(t))
        if sampler == "ddim":
            x[sel] = ddim_jump(x[sel], x0, abar(t), abar(s))
        else:
            z = torch.randn(x[sel].shape, generator=generator).to(x.device)
            if not final_noise:
                z = z * torch.tensor([float(j + 1 < len(paths[i])) for i in idx], device=x.device,
                                     dtype=z.dtype).view(-1, 1, 1, 1)
            x[sel] = ddpm_jump(x[sel], x0, out[:, 3:] if out.shape[1] == 6 else None, abar(t), abar(s), z)
    return x


# --------------------------------------------------------------------------- the trainer

class DistillTrainer(Trainer):
    """One round: the Trainer with the progressive-distillation objective in place of the diffusion loss."""

    def __init__(self, cfg: TrainingConfig, data, out, *, teacher: Checkpoint, grids: tuple[list[int], list[int]],
                 dcfg: DistillConfig, info: dict[str, Any], resume=None, device=None, progress=True):
        self._saved_fake: dict[str, Any] | None = None  # a resumed run's fake-score state (method dmd)
        super().__init__(cfg, data, out, resume=resume, device=device, progress=progress,
                         init_weights=teacher.weights(ema=True), init_trained_on=teacher.meta.get("trained_on"))
        self.teacher = teacher.build(ema=True, device=self.dist.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_grid, self.student_grid = grids
        self.dcfg, self.info = dcfg, info
        abar = torch.tensor(schedule_for(cfg.diffusion).alphas_cumprod, dtype=torch.float64)
        self._abar = torch.cat([abar, abar.new_ones(1)]).float().to(self.dist.device)  # index T = clean
        self.fake = self._fake_score() if dcfg.method == "dmd" else None
        if self.fake is not None:
            self.metrics = (*self.metrics, "dmd", "fake_loss")
        self._fake_inputs: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # this step's (x0_hat, cond)
        self._dmd_terms: list[torch.Tensor] = []

    # ------------------------------------------------------------------ method dmd: the fake score

    def _fake_score(self) -> torch.nn.Module:
        """The fake-score model of method dmd: the teacher's copy, trained on the student's x0 (its optimizer
        ``self.fake_opt``; a resumed run's state restored)."""
        fake = copy.deepcopy(self.teacher).train()  # its own tensors (build() assigns the checkpoint's)
        for p in fake.parameters():
            p.requires_grad_(True)
        self.fake_opt = make_optimizer(fake.parameters(), self.cfg.optim, self.dcfg.fake_lr or None)
        if self.step > 0 and self._saved_fake is None:
            raise ValueError(f"{self.out}: its checkpoint holds no fake-score state (not a --method dmd run); "
                             f"use a new --out")
        if self._saved_fake is not None:
            fake.load_state_dict(self._saved_fake["state_dict"])
            self.fake_opt.load_state_dict(self._saved_fake["optimizer"])
        self.fake_ddp = self._wrap_ddp(fake)
        return fake

    def _extra_state(self) -> dict[str, Any]:
        if self.fake is None:
            return {}
        return {"dmd_fake": {"state_dict": {k: v.detach().cpu().clone() for k, v in self.fake.state_dict().items()},
                             "optimizer": self.fake_opt.state_dict()}}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self._saved_fake = extra.get("dmd_fake")  # applied once the fake model exists (_fake_score)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar at original timesteps [b] (CLEAN -> 1) shaped [b, 1, 1, 1]."""
        return self._abar[torch.where(t < 0, self._abar.numel() - 1, t)].view(-1, 1, 1, 1)

    def checkpoint(self) -> Checkpoint:
        ckpt = super().checkpoint()
        return dataclasses.replace(ckpt, meta={**ckpt.meta, "distill": self.info})

    def targets(self, x0: torch.Tensor, noise: torch.Tensor, seg: list[int], roll: list[bool],
                cond: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_in, t_in, eps_target)`` of a micro-batch (no grad); ``seg[i]``: student-grid index k >= 0;
        ``generator``: the DDPM steps' noise."""
        sg, dev, sampler = self.student_grid, x0.device, self.dcfg.sampler
        start = [sg[k + 1] if r else sg[k] for k, r in zip(seg, roll)]
        lo = [sg[k - 1] if k > 0 else CLEAN for k in seg]
        t_start, t_in = torch.tensor(start, device=dev), torch.tensor([sg[k] for k in seg], device=dev)
        a_start = self.abar(t_start)
        x_start = a_start.sqrt() * x0 + (1 - a_start).sqrt() * noise
        x_in = x_start.clone()
        rolled = [i for i, r in enumerate(roll) if r]
        if rolled:  # the student's own step from t_{k+1} to t_k
            was = self.model.training
            self.model.eval()
            x_in = run_teacher(self.model, x_in, [[start[i]] if r else [] for i, r in enumerate(roll)],
                               [sg[k] for k in seg], self.abar, cond, sampler, generator)
            self.model.train(was)
        paths = [teacher_path(self.teacher_grid, s, e) for s, e in zip(start, lo)]
        x_tgt = run_teacher(self.teacher, x_start, paths, lo, self.abar, cond, sampler, generator, final_noise=False)
        a_in, a_lo = self.abar(t_in), self.abar(torch.tensor(lo, device=dev))
        if sampler == "ddim":  # the x0 the engine can reach (it clamps)
            x0_t = distill_x0(x_in, x_tgt, a_in, a_lo).clamp(-1.0, 1.0)
        else:  # a noisy regression target: clamping it would bias its mean
            x0_t = ddpm_x0(x_in, x_tgt, a_in, a_lo)
        return x_in, t_in, eps_for_x0(x_in, x0_t, a_in)

    def _micro(self, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached [5] (loss, mse, vlb = 0, lip, dc = 0)."""
        cfg, dev = self.cfg, self.dist.device
        b = self._micro_batch(batch, micro)
        x0 = b["x0"]
        n = x0.shape[0]
        g = self._rng(micro, 1)
        seg = torch.randint(0, len(self.student_grid) - 1, (n,), generator=g).tolist()  # the top step never
        # no rollout into t = 0: there sigma = 0.006, and eps would have to be 150x the x gap it closes
        sg = self.student_grid
        roll = [bool(r) and sg[k] > 0 for r, k in zip(torch.rand(n, generator=g) < self.dcfg.rollout, seg)]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        torch.manual_seed(self._seed(micro, 2))  # dropout masks
        steps_noise = self._rng(micro, 4)  # the teacher's (and rollouts') DDPM step noise
        with torch.no_grad():
            x_in, t_in, eps_t = self.targets(x0, noise, seg, roll, b, steps_noise)
        a_in = self.abar(t_in)
        weight = ((1 - a_in) / a_in).clamp(min=1.0).view(-1)  # max(1, 1/SNR)
        net = self.ddp or self.model
        with self._grad_sync(micro):
            with self._autocast():
                out = net(x_in, t_in, b["identity"], motion_frames=b["motion"], audio_emb=b["audio"])
            eps = out[:, :3].float()
            mse = (weight * mean_flat((eps - eps_t) ** 2)).mean()
            lip = masked_mse(eps, eps_t, box_mask(b["lip_box"], x0.shape[2], x0.shape[3]), weight)
            loss = mse + cfg.loss.lambda_lip * lip
            if self.fake is not None:
                x0_hat = x0_from_eps(x_in, eps, a_in)  # the frame the engine's step takes from this call
                dmd = self.dmd_loss(x0_hat, b, self._rng(micro, 5))
                loss = self.dcfg.regression_weight * loss + self.dcfg.dmd_weight * dmd
                self._fake_inputs.append((x0_hat.detach(), b))
                self._dmd_terms.append(dmd.detach())
            self.scaler.scale(loss / cfg.train.grad_accum).backward()
        zero = loss.new_zeros(())
        return torch.stack([v.detach().float() for v in (loss, mse, zero, lip, zero)])

    # ------------------------------------------------------------------ method dmd: the two terms

    def _score_x0(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = net(x_t, t, cond["identity"], motion_frames=cond["motion"], audio_emb=cond["audio"])
        return x0_from_eps(x_t, out[:, :3].float(), self.abar(t))

    def dmd_loss(self, x0_hat: torch.Tensor, cond: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        """Distribution matching (Yin et al. 2024, DMD/DMD2): ``x0_hat`` noised to a random t in [0.02 T, 0.98 T];
        the gradient on it is the fake score's x0 minus the teacher's (normalised per sample by the mean
        |x0_hat - teacher x0|), which moves the student's frames toward the teacher's distribution given the
        same identity, motion frames and audio, rather than toward its mean."""
        n, T = x0_hat.shape[0], self.tables.num_timesteps
        t = torch.randint(int(0.02 * T), int(0.98 * T), (n,), generator=g).to(x0_hat.device)
        z = torch.randn(x0_hat.shape, generator=g).to(x0_hat.device)
        with torch.no_grad():
            x_t = q_sample(x0_hat.detach(), t, z, self.tables)
            real = self._score_x0(self.teacher, x_t, t, cond)
            self.fake.eval()
            fake = self._score_x0(self.fake, x_t, t, cond)
            self.fake.train()
            target = dmd_target(x0_hat.detach(), real, fake)
        return 0.5 * mean_flat((x0_hat - target) ** 2).mean()

    def _fake_step(self) -> float:
        """One optimizer step of the fake score: the diffusion (eps) loss on this step's student frames."""
        accum, T = len(self._fake_inputs), self.tables.num_timesteps
        net = self.fake_ddp or self.fake
        total = 0.0
        for i, (x0_hat, cond) in enumerate(self._fake_inputs):
            g = self._rng(i, 6)
            t = torch.randint(0, T, (x0_hat.shape[0],), generator=g).to(x0_hat.device)
            z = torch.randn(x0_hat.shape, generator=g).to(x0_hat.device)
            x_t = q_sample(x0_hat, t, z, self.tables)
            with self._grad_sync(i, self.fake_ddp):
                with self._autocast():
                    out = net(x_t, t, cond["identity"], motion_frames=cond["motion"], audio_emb=cond["audio"])
                loss = mean_flat((out[:, :3].float() - z) ** 2).mean()
                (loss / accum).backward()
            total += float(loss.detach()) / accum
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.cfg.optim.grad_clip)
        self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)
        self._fake_inputs.clear()
        return total

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The student's step; with method dmd, then the fake score's on the frames the student just made."""
        m = super().train_step(batches)
        if self.fake is not None:
            m["dmd"] = float(torch.stack(self._dmd_terms).mean())
            self._dmd_terms.clear()
            m["fake_loss"] = self._fake_step()
        return m


# --------------------------------------------------------------------------- the command

@dataclass
class DistillResult:
    """The student checkpoint written, and what each round did."""

    student: Path
    rounds: list[FitResult]


def teacher_digest(path: str | os.PathLike) -> str:
    """sha256 of a teacher checkpoint file, or of a bundle folder's ``unet.onnx`` (where its weights are)."""
    path = Path(path)
    return sha256_file(path / UNET_ONNX if path.is_dir() else path)


def student_config(base: TrainingConfig, teacher: Checkpoint, data: str | os.PathLike, steps: int,
                   sampler: str = "ddim", spacing: str = "uniform") -> TrainingConfig:
    """``base``'s data/loss/optim/train sections with the teacher's architecture; its diffusion: ``sampler``
    at ``steps`` placed by ``spacing`` (what ``dh-run`` then uses by default).

    Checkpoints that do not record ``image_size`` (TorchScript, Lightning, bare state_dicts) take the data's.
    """
    store = ClipStore(data, "train")
    store.require_encoder(teacher.audio, "the teacher")
    model = teacher.model
    if teacher.source != "dheads" and model.image_size != store.size:
        log.info("%s checkpoint records no image size: using the data's %d px", teacher.source, store.size)
        model = dataclasses.replace(model, image_size=store.size)
    d = teacher.diffusion
    return base.replace(model=model, diffusion=DiffusionConfig(num_timesteps=d.num_timesteps, schedule=d.schedule,
                                                               sampling_steps=steps, sampler=sampler,
                                                               spacing=spacing))


def distill(teacher_path: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, dcfg: DistillConfig,
            base: TrainingConfig, *, resume: bool = True, device: str | None = None,
            progress: bool = True) -> DistillResult:
    """Distil the teacher into a ``dcfg.steps``-step ``dcfg.sampler`` student in ``dcfg.rounds`` halvings (module doc).

    Round r trains in ``out/round_r`` (``base.train.steps`` optimizer steps; its teacher: ``out/round_{r-1}/
    last.pt``); the final student is ``out/student.pt``. ``resume``: continue each round from its
    ``last.pt`` (a finished round is skipped); a folder holding another teacher's distillation is refused.
    """
    out = Path(out)
    teacher0 = load_checkpoint(teacher_path)
    digest = teacher_digest(teacher_path)
    T, schedule = teacher0.diffusion.num_timesteps, schedule_for(teacher0.diffusion)
    own = make_plan(teacher0.diffusion).schedule.timesteps.tolist() if dcfg.teacher_grid == "own" else None
    grids = round_grids(T, dcfg.steps, dcfg.rounds, dcfg.teacher_substeps,
                        final=SPACING_FNS[dcfg.spacing](schedule, dcfg.steps), teacher_own=own)
    results, teacher = [], teacher0
    for r, (tg, sg) in enumerate(grids, start=1):
        cfg = student_config(base, teacher0, data, len(sg), dcfg.sampler, dcfg.spacing)
        info = {"teacher": str(teacher_path), "teacher_sha256": digest, "teacher_source": teacher0.source,
                **dcfg.to_dict(), "round": r, "round_teacher_steps": len(tg), "round_steps": len(sg),
                "grid": sg, "teacher_grid": tg, "teacher_grid_rule": dcfg.teacher_grid,
                "engine_grid": sg == SPACING_FNS[dcfg.spacing](schedule, len(sg))}
        run = out / f"round_{r}"
        last = run / "last.pt"
        ckpt = last if resume and last.is_file() else None
        if ckpt is not None:
            held = load_checkpoint(ckpt).meta.get("distill", {})
            if (held.get("teacher_sha256") != digest or held.get("round_steps") != len(sg)
                    or held.get("method", "progressive") != dcfg.method
                    or held.get("round_teacher_steps", len(tg)) != len(tg) or held.get("grid", sg) != sg):
                raise ValueError(f"{run} holds a distillation of another teacher, step count, grid, teacher path or "
                                 f"method; use a new --out")
        log.info("round %d/%d: %d-step %s teacher -> %d-step student (timesteps %s)", r, len(grids), len(tg),
                 dcfg.sampler, len(sg), sg)
        trainer = DistillTrainer(cfg, data, run, teacher=teacher, grids=(tg, sg), dcfg=dcfg, info=info,
                                 resume=ckpt, device=device, progress=progress)
        results.append(trainer.fit())
        if trainer.dist.distributed:
            dist.barrier()  # rank 0 has written last.pt
        teacher = load_checkpoint(last)
    student = out / "student.pt"
    if trainer.dist.is_main:
        _atomic_link(last, student)
    if trainer.dist.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return DistillResult(student, results)
