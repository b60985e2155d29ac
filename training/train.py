"""The training loop (``dh-train fit``): single process, or DDP under ``torchrun``.

Determinism: every random draw of step s is seeded from ``(seed, s, rank, micro-batch)``: the
samples (``dataset.batch_specs``), the timesteps and noise, and the dropout masks (the global torch
RNG is re-seeded before each forward). So a resumed run repeats an uninterrupted one exactly
(same losses, bit for bit, on the same hardware and thread count), whatever was interrupted.
The RNG states are saved in checkpoints as well, for code that draws outside this scheme.

Checkpoints: our ``dheads`` format (``engine.checkpoint.save_checkpoint``, atomic: temp file,
fsync, rename) with the training state (optimizer, scaler, step, RNG states, data order, config)
in ``extra``; ``load_checkpoint``/``dh-export``/``dh-run`` read them as they are. A kill at any
moment leaves the previous checkpoint intact and loses only the steps since it.

Output folder: ``config.toml``, ``checkpoints/step_XXXXXXXX.pt``, ``last.pt`` (a hard link to the
newest), ``metrics.csv`` (and ``tb/`` with TensorBoard), ``samples/step_XXXXXXXX.mp4``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dheads.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dheads.engine.config import AudioConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.threads import worker_init

from . import health
from .augment import augment
from .config import OptimConfig, TrainingConfig, dumps_toml
from .dataset import (ClipStore, FrameDataset, StepBatchSampler, preview_inputs, speaker_balanced, step_seed,
                      training_record)
from .diffusion import make_tables, q_sample, schedule_for
from .losses import box_mask, diffusion_losses

log = logging.getLogger(__name__)

METRICS = ("loss", "mse", "vlb", "lip", "dc", "lr", "grad_norm", "samples_per_s")


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1), else a single process.

    Device: ``device`` if given, else ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.
    Backend: NCCL on CUDA, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


# --------------------------------------------------------------------------- EMA, lr, RNG

class EMA:
    """Exponential moving average of a model's floating-point state (fp32 shadow copies).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` with ``warmup`` (t = optimizer steps done), else ``decay``.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(sd[k])


def make_optimizer(params, o: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``o`` names (AdamW or Adam) over ``params``, at ``lr`` (default ``o.lr``)."""
    opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(params, lr=o.lr if lr is None else lr, betas=tuple(o.betas), eps=o.eps,
                   weight_decay=o.weight_decay)


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant/cosine/linear
    decay to ``min_lr_ratio * lr`` at ``total``. A pure function of the step (nothing to resume)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * p)) if cfg.lr_schedule == "cosine" else 1 - p
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def rng_state() -> dict[str, Any]:
    """Every RNG this process holds, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- logging

class ScalarLog:
    """Scalars to ``metrics.csv`` and/or TensorBoard (``tb/``); on resume, rows after the resumed step
    are dropped so the file reads as one run."""

    def __init__(self, out: Path, backend: str, start_step: int, metrics: tuple[str, ...] = METRICS):
        self.metrics = metrics
        self.csv_path = out / "metrics.csv" if backend in ("csv", "both") else None
        self.tb = None
        if backend in ("tensorboard", "both"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard); logging to metrics.csv")
                self.csv_path = out / "metrics.csv"
        if self.csv_path is not None:
            self._truncate(start_step)

    def _truncate(self, start_step: int) -> None:
        rows = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=("step", *self.metrics))
            w.writeheader()
            w.writerows(rows)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.csv_path is not None:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=("step", *self.metrics)).writerow(
                    {"step": step, **{k: f"{scalars[k]:.6g}" for k in self.metrics if k in scalars}})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


PROGRESS_EVERY_S = 30.0  # a log line this often when stderr is not a terminal (a log file, a batch job)


def _progress(enabled: bool, total: int, done: int):
    """A rich bar on a terminal; elsewhere a bar shows nothing until the end, so a ``ProgressLog`` line instead.

    Returns ``(context, update(step, loss, rate))``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if enabled and not sys.stderr.isatty():
        from dheads.engine.progress import ProgressLog

        plog = ProgressLog(log, "step", every_s=PROGRESS_EVERY_S, unit="samples/s")
        return contextlib.nullcontext(), lambda step, loss, rate: plog.update(step, total, rate, loss=loss)
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} samples/s"),
                   TimeRemainingColumn(), disable=not enabled)
    task = bar.add_task("steps", total=total, completed=done, loss=float("nan"), rate=0.0)
    return bar, lambda step, loss, rate: bar.update(task, completed=step, loss=loss, rate=rate)


# --------------------------------------------------------------------------- the trainer

@dataclass
class FitResult:
    """What a ``fit`` call did: the steps it ran and their losses, and the last checkpoint written."""

    start_step: int
    end_step: int
    losses: list[float] = field(default_factory=list)  # total loss of each step run here, in order
    last_checkpoint: Path | None = None


class Trainer:
    """Owns the model, optimizer, EMA and data of one run; ``fit()`` runs it."""

    metrics: tuple[str, ...] = METRICS  # the columns of metrics.csv

    def __init__(self, cfg: TrainingConfig, data: str | os.PathLike, out: str | os.PathLike, *,
                 resume: str | os.PathLike | None = None, device: str | None = None, progress: bool = True,
                 init_weights: dict[str, torch.Tensor] | None = None, init_source: tuple[str, dict] | None = None,
                 init_trained_on: dict | None = None):
        """``init_weights``: start from these weights (e.g. a distillation teacher's) instead of a random
        init; a ``resume`` checkpoint's weights replace them. ``init_source``: ``(name, audio config dict)``
        of the checkpoint they came from, checked against the data's audio before anything is written.
        ``init_trained_on``: that checkpoint's ``meta["trained_on"]``, merged into this run's record."""
        self.cfg, self.out, self.show_progress = cfg, Path(out), progress
        self.dist = setup_distributed(device)
        if cfg.train.precision == "fp16" and self.dist.device.type != "cuda":
            raise ValueError("fp16 autocast needs CUDA; use precision fp32 or bf16 on the CPU")
        seed_everything(cfg.train.seed)
        self.store = ClipStore(data, "train", cfg.data.cache)
        self.dataset = FrameDataset(self.store, cfg.model, cfg.loss, rollouts=cfg.data.motion_rollout_prob > 0)
        self.audio: AudioConfig = self.store.audio
        self.trained_on = training_record(self.store, init_trained_on)
        if init_source is not None:
            self._require_audio(*init_source)
        self.tables = make_tables(schedule_for(cfg.diffusion), self.dist.device)

        self.health_batch = self._health_batch() if self.dist.is_main else None
        self.model = DiffusedHeadsUNet(cfg.model, cfg.diffusion).to(self.dist.device)
        if init_weights is not None:
            self._init_from(init_weights)
        o = cfg.optim
        self.optimizer = make_optimizer(self.model.parameters(), o)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=cfg.train.precision == "fp16")
        self.ema = EMA(self.model, o.ema_decay, o.ema_warmup) if self.dist.is_main else None
        self.step = 0
        if resume is not None:
            self._load(Path(resume))
        self.ddp = self._wrap_ddp(self.model)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dumps_toml(cfg))
            for stale in [*self.out.glob("checkpoints/.step_*.tmp"), self.out / ".last.pt.tmp"]:
                stale.unlink(missing_ok=True)  # left by a run killed while saving
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model %.2f M parameters on %s, world size %d, starting at step %d", n_params / 1e6,
                 self.dist.device, self.dist.world_size, self.step)

    def _require_audio(self, source: str, audio: dict) -> None:
        """``ValueError`` unless a checkpoint's audio config (``audio``, a dict) is the data's."""
        if audio != self.audio.to_dict():
            raise ValueError(f"{source}: trained on {audio} audio features, but {self.store.root} "
                             f"holds {self.audio.to_dict()}")

    def _init_from(self, weights: dict[str, torch.Tensor]) -> None:
        """Load every parameter from ``weights``; buffers they lack (a colour anchor added for this run)
        keep this model's own values."""
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        params = {n for n, _ in self.model.named_parameters()}
        bad = sorted(set(unexpected) | (set(missing) & params))
        if bad:
            raise ValueError(f"the starting weights do not fit this model: {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}")

    # ------------------------------------------------------------------ checkpoints

    def _health_batch(self) -> dict[str, torch.Tensor]:
        """Fixed frames for the health check: the held-out (test) clips where there are any."""
        try:
            store, split = ClipStore(self.store.root, "test", self.cfg.data.cache), "test"
        except ValueError:
            store, split = self.store, "train"
            log.warning("%s has no test clips: the model-health check uses training frames", self.store.root)
        batch = health.health_batch(FrameDataset(store, self.cfg.model, self.cfg.loss))
        log.info("model-health check: %d frames of the %s split", batch["x0"].shape[0], split)
        return {k: v.to(self.dist.device) for k, v in batch.items()}

    def check_health(self) -> health.HealthReport:
        """The health check on the EMA weights, appended to ``health.jsonl`` (a loud warning when it fails)."""
        net = self.checkpoint().build(ema=True, device=self.dist.device)
        report = health.measure(net, self.health_batch, self.tables)
        health.append_report(self.out / "health.jsonl", self.step, report)
        health.log_report(report, f"step {self.step}")
        return report

    def checkpoint(self) -> Checkpoint:
        sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return Checkpoint(model=self.cfg.model, state_dict=sd, audio=self.audio, diffusion=self.cfg.diffusion,
                          ema_state_dict=self.ema.state_dict() if self.ema else None, source="dheads",
                          meta={"step": self.step, "trainer": "dheads.training", "data": str(self.store.root),
                                "trained_on": self.trained_on})

    def save(self) -> Path:
        """Write ``checkpoints/step_N.pt`` atomically and point ``last.pt`` at it (rank 0 only)."""
        ckpt_dir = self.out / "checkpoints"
        path = ckpt_dir / f"step_{self.step:08d}.pt"
        extra = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "rng": rng_state(), "training_config": self.cfg.to_dict(),
                 "data_order": {"scheme": "stateless-v1", "seed": self.cfg.train.seed, "next_step": self.step,
                                "world_size": self.dist.world_size, "clips": list(self.store.ids)},
                 **self._extra_state()}
        save_checkpoint(path, self.checkpoint(), extra)
        _atomic_link(path, self.out / "last.pt")
        self.check_health()
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        log.info("saved %s", path)
        return path

    def _wrap_ddp(self, module: torch.nn.Module) -> DDP | None:
        """``module`` in DDP when this run is distributed, else None."""
        if not self.dist.distributed:
            return None
        return DDP(module, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None)

    def _extra_state(self) -> dict[str, Any]:
        """More training state for a checkpoint's ``extra`` (a subclass's second model, say)."""
        return {}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        """Restore what ``_extra_state`` saved."""

    def _load(self, path: Path) -> None:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        extra = obj.get("extra") or {}
        if "optimizer" not in extra:
            raise ValueError(f"{path}: holds no training state (optimizer, step); it cannot be resumed")
        saved_model = obj["model_config"]
        if saved_model != self.cfg.model.to_dict():
            raise ValueError(f"{path}: model config {saved_model} differs from this run's {self.cfg.model.to_dict()}")
        self._require_audio(str(path), obj["audio_config"])
        order = extra.get("data_order", {})
        if order.get("clips") not in (None, list(self.store.ids)):
            log.warning("%s: the training clips changed since this checkpoint; the data order will differ", path)
        if order.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %s-process run on %d processes: the data order differs from then",
                        order.get("world_size"), self.dist.world_size)
        self.model.load_state_dict(obj["state_dict"])
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.scaler.is_enabled() and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(obj["ema_state_dict"] or obj["state_dict"])
        self.step = int(extra["step"])
        self._load_extra(extra)
        set_rng_state(extra["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _seed(self, micro: int, stream: int) -> int:
        """The seed of one random stream of this step's micro-batch (1: timesteps and noise, 2: dropout,
        3: augmentation; subclasses may add more), the same whatever the worker count or a resume."""
        return step_seed(self.cfg.train.seed, self.step, self.dist.rank, micro, stream)

    def _rng(self, micro: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(micro, stream))

    def _micro_batch(self, batch: dict[str, torch.Tensor], micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch on the device, augmented from its own random stream."""
        b = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        return augment(b, self.cfg.data, self.cfg.model.motion_frames, self.step, self._rng(micro, 3))

    def _grad_sync(self, micro: int, ddp: DDP | None = None):
        """DDP (``ddp``, default the model's) all-reduces the gradients on a step's last micro-batch only."""
        ddp = ddp or self.ddp
        last = micro == self.cfg.train.grad_accum - 1
        return contextlib.nullcontext() if (ddp is None or last) else ddp.no_sync()

    def _micro(self, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached [5] (loss, mse, vlb, lip, dc)."""
        cfg, dev = self.cfg, self.dist.device
        b = self._micro_batch(batch, micro)
        x0 = b["x0"]
        g = self._rng(micro, 1)
        t = torch.randint(0, self.tables.num_timesteps, (x0.shape[0],), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        torch.manual_seed(self._seed(micro, 2))  # dropout masks
        x_t = q_sample(x0, t, noise, self.tables)
        net = self.ddp or self.model
        with self._grad_sync(micro):
            with self._autocast():
                out = net(x_t, t, b["identity"], motion_frames=b["motion"], audio_emb=b["audio"])
            mask = box_mask(b["lip_box"], x0.shape[2], x0.shape[3])
            terms = diffusion_losses(out, noise, x0, x_t, t, self.tables, mask, cfg.loss)
            self.scaler.scale(terms.loss / cfg.train.grad_accum).backward()
        return torch.stack([v.detach().float() for v in terms])

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns this rank's metrics."""
        o = self.cfg.optim
        lr = lr_at(o, self.step, self.cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        sums = sum(self._micro(batch, i) for i, batch in enumerate(batches)) / len(batches)
        self.scaler.unscale_(self.optimizer)
        params = list(self.model.parameters())
        if o.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step - 1)
        loss, mse, vlb, lip, dc = sums.tolist()
        return {"loss": loss, "mse": mse, "vlb": vlb, "lip": lip, "dc": dc, "lr": lr, "grad_norm": float(gnorm)}

    # ------------------------------------------------------------------ samples

    def write_sample(self) -> Path:
        """A short video from the EMA weights: generated frames beside the real ones, with the audio."""
        t = self.cfg.train
        path = self.out / "samples" / f"step_{self.step:08d}.mp4"
        return write_preview(self.checkpoint(), self.store.root, path, frames=t.sample_frames,
                             sampler=t.sample_sampler, steps=t.sample_steps, device=self.dist.device,
                             cache=self.cfg.data.cache)

    # ------------------------------------------------------------------ the loop

    def fit(self, until: int | None = None) -> FitResult:
        """Train from ``self.step`` to ``train.steps`` (or pause after step ``until``); the last step
        run always writes a checkpoint."""
        t, main = self.cfg.train, self.dist.is_main
        stop = min(t.steps, until) if until is not None else t.steps
        result = FitResult(self.step, self.step)
        if self.step >= stop:
            return result
        sampler = StepBatchSampler(self.store.lengths, seed=t.seed, batch_size=t.batch_size,
                                   grad_accum=t.grad_accum, start=self.step, stop=stop, rank=self.dist.rank,
                                   identity=self.cfg.data.identity,
                                   clip_p=speaker_balanced(self.store.clip_speakers, self.cfg.data.speaker_balance))
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                                             worker_init_fn=worker_init, pin_memory=self.dist.device.type == "cuda",
                                             persistent_workers=False)
        scalars = ScalarLog(self.out, t.log_backend, self.step, self.metrics) if main else None
        bar, show = _progress(self.show_progress and main, t.steps, self.step)
        it = iter(loader)
        samples_per_step = t.batch_size * t.grad_accum * self.dist.world_size
        try:
            with bar:
                while self.step < stop:
                    tic = time.perf_counter()
                    m = self.train_step([next(it) for _ in range(t.grad_accum)])
                    m["samples_per_s"] = samples_per_step / (time.perf_counter() - tic)
                    result.losses.append(m["loss"])
                    if self.step % t.log_every == 0 or self.step == stop:
                        m = self._reduce(m)
                        if scalars is not None:
                            scalars.write(self.step, m)
                    show(self.step, m["loss"], m["samples_per_s"])
                    if main and (self.step % t.checkpoint_every == 0 or self.step == stop):
                        result.last_checkpoint = self.save()
                    if main and t.sample_every and self.step % t.sample_every == 0:
                        log.info("sample video: %s", self.write_sample())
        finally:
            if scalars is not None:
                scalars.close()
        result.end_step = self.step
        return result

    def _reduce(self, m: dict[str, float]) -> dict[str, float]:
        """Average the loss terms over ranks (every rank calls this at the same steps)."""
        if not self.dist.distributed:
            return m
        keys = ("loss", "mse", "vlb", "lip", "dc", "grad_norm")
        v = torch.tensor([m[k] for k in keys], device=self.dist.device)
        dist.all_reduce(v)
        out = dict(m)
        out.update({k: x / self.dist.world_size for k, x in zip(keys, v.tolist())})
        out["samples_per_s"] = m["samples_per_s"]
        return out


def write_preview(ckpt: Checkpoint, data: str | os.PathLike, path: str | os.PathLike, *, frames: int = 8,
                  sampler: str = "ddim", steps: int = 20, clip: str | None = None, ema: bool = True,
                  device: torch.device | str = "cpu", cache: str = "auto", seed: int = 0) -> Path:
    """Generate ``frames`` frames for a prepared clip (its frame 0 as identity, its audio embeddings)
    with ``engine.reference.generate_reference`` and write ``generated | real`` side by side, with
    the clip's audio, to ``path`` (mp4). The clip: ``clip`` by id, else the first test clip, else
    the first training clip."""
    from dheads.engine.config import SamplerConfig
    from dheads.engine.image import to_uint8_frames
    from dheads.engine.reference import generate_reference
    from dheads.engine.video import write_mp4

    store = None
    for split in ("test", "train", "val"):
        try:
            s = ClipStore(data, split, cache, audio=True)
        except ValueError:
            continue
        if clip is None or clip in s.ids:
            store = s
            break
    if store is None:
        raise ValueError(f"{data}: no prepared clip {clip or ''} to sample from")
    k = store.ids.index(clip) if clip is not None else 0
    identity, emb, real, audio = preview_inputs(store, ckpt.model, frames, clip=k)
    net = ckpt.build(ema=ema, device=device)
    cfg = SamplerConfig(name=sampler, steps=min(steps, ckpt.diffusion.num_timesteps))
    gen = generate_reference(net, identity.to(device), emb.to(device), sampler=cfg,
                             diffusion=ckpt.diffusion, seed=seed).cpu()
    side = torch.cat([gen, real], dim=3)  # generated | real
    rgb = to_uint8_frames(side)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, list(rgb), fps=ckpt.audio.fps, audio=audio, sample_rate=ckpt.audio.sample_rate)
    return path


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, or a copy where links fail)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# Model settings that own no parameters: a fine-tune may change them (``--init``).
INIT_FREE_KEYS = frozenset({"dropout", "color_anchor", "motion_mask", "motion_mask_feather"})


def init_checkpoint(path: str | os.PathLike, cfg: TrainingConfig) -> Checkpoint:
    """The checkpoint a fine-tune starts from (any format ``load_checkpoint`` opens; its EMA weights are
    used where present). Its model config must be this run's but for the parameter-free keys
    (``INIT_FREE_KEYS``: dropout, the colour anchor, the motion-frame mask; the run's apply):
    ``ValueError`` names the keys that differ."""
    ckpt = load_checkpoint(path)
    theirs, ours = ckpt.model.to_dict(), cfg.model.to_dict()
    diff = sorted(k for k in set(theirs) | set(ours) if k not in INIT_FREE_KEYS and theirs.get(k) != ours.get(k))
    if diff:
        shown = ", ".join(f"{k} = {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff)
        raise ValueError(f"--init {path}: its model config differs from this run's ({shown}); "
                         f"pass --set model.KEY=VALUE or a matching --config")
    if ckpt.diffusion.num_timesteps != cfg.diffusion.num_timesteps or ckpt.diffusion.schedule != cfg.diffusion.schedule:
        raise ValueError(f"--init {path}: trained on a {ckpt.diffusion.schedule} schedule of "
                         f"{ckpt.diffusion.num_timesteps} steps, this run uses {cfg.diffusion.schedule} of "
                         f"{cfg.diffusion.num_timesteps}")
    return ckpt


def fit(cfg: TrainingConfig, data: str | os.PathLike, out: str | os.PathLike, *,
        resume: str | os.PathLike | None = None, device: str | None = None, progress: bool = True,
        until: int | None = None, init: str | os.PathLike | None = None) -> FitResult:
    """Train ``cfg`` on the prepared clips in ``data``, writing to ``out``; see the module docstring.

    ``resume``: a checkpoint written by this trainer (e.g. ``out/last.pt``). ``until``: pause after this
    step (a checkpoint is written there; ``resume`` continues as if nothing happened). ``init``: a fresh
    run (step 0, new optimizer) from that checkpoint's weights (:func:`init_checkpoint`); ignored when
    resuming, so an interrupted fine-tune resumes like any run.
    """
    start = init_checkpoint(init, cfg) if init is not None and resume is None else None
    trainer = Trainer(cfg, data, out, resume=resume, device=device, progress=progress,
                      init_weights=start.weights(ema=True) if start else None,
                      init_source=(f"--init {init}", start.audio.to_dict()) if start else None,
                      init_trained_on=start.meta.get("trained_on") if start else None)
    if start is not None:
        log.info("starting from the weights of %s", init)
    try:
        return trainer.fit(until=until)
    finally:
        if trainer.dist.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def resolve_resume(out: str | os.PathLike, resume: str | None) -> Path | None:
    """``None``/``"no"``: a fresh run; ``"auto"`` (``dh-train fit``'s default): ``out/last.pt`` if it exists;
    else a path."""
    if resume in (None, "", "no"):
        return None
    if resume == "auto":
        p = Path(out) / "last.pt"
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return p


def saved_config(path: str | os.PathLike, required: bool = True) -> dict[str, Any] | None:
    """The training config stored in a checkpoint's training state (what a resumed run continues with);
    None where there is none and not ``required``, else ValueError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is "unreadable" to the user
        raise ValueError(f"{path}: cannot be read as a checkpoint ({str(e).strip().splitlines()[0][:200]})") from None
    cfg = (obj.get("extra") or {}).get("training_config") if isinstance(obj, dict) else None
    if cfg is None and required:
        raise ValueError(f"{path}: no training config inside; pass --config")
    return cfg
