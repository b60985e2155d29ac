"""``dh-train``: prepare videos into training clips, train, and preview a checkpoint.

    dh-train prepare VIDEOS OUT [--size 128] [--jobs 4]          # folder or file list -> clips
    dh-train fit --data OUT --out RUN [--config tiny] [--set optim.lr=1e-4] [--resume auto]
    torchrun --nproc_per_node 8 -m dheads.training.cli fit --data OUT --out RUN --config crema
    dh-train sample RUN/last.pt --data OUT --out preview.mp4 [--frames 25]
    dh-train health RUN/last.pt --data OUT                       # can the model see colour? exit 1 if not
    dh-train distill --teacher T.pt --data OUT --steps 4 --out STUDENT  # a 4-step DDIM student

Thin: flags become config values and one library call (``prepare.prepare``, ``train.fit``,
``train.write_preview``, ``distill.distill``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dheads.engine.cli_errors import OneLineErrorsGroup

app = typer.Typer(cls=OneLineErrorsGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Train Diffused Heads models: prepare data, fit, preview.")
log = logging.getLogger("dheads.training")


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)])


def _threads(threads: int) -> None:
    """Set this process's thread policy before any parallel work (see ``dheads.engine.threads``)."""
    from dheads.engine import threads as policy

    try:
        policy.apply(policy.training_policy(policy.parse_threads(threads)))
    except ValueError as e:
        _fail(str(e))


THREADS_HELP = ("torch CPU threads per process (0 = auto: OMP_NUM_THREADS, else the cores the load average "
                "leaves free, split over torchrun's ranks on this node)")


def _require(checkpoint: Path, data: Path) -> None:
    """One line for a checkpoint or data folder that is not there, before the thread policy logs anything (the
    deeper checks, what a file holds, stay with the library)."""
    if not checkpoint.exists():
        _fail(f"{checkpoint}: no such file")
    if not data.is_dir():
        _fail(f"--data {data}: no such folder (make one with `dh-train prepare`)")


def _fail(message: str) -> None:
    typer.echo(f"dh-train: error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def prepare(
    source: Annotated[Path, typer.Argument(help="folder of videos (searched recursively) or a text file "
                                                "listing them (path[TAB]speaker per line)")],
    out: Annotated[Path, typer.Argument(help="output folder (re-run to resume)")],
    size: Annotated[int, typer.Option(help="frame size in pixels (the model's image_size)")] = 128,
    encoder: Annotated[str, typer.Option(help="audio encoder: whisper (tiny.en, 384-d) or sda (256-d)")] = "whisper",
    encoder_path: Annotated[Optional[Path], typer.Option(help="SDA audio_encoder.pt, or a CTranslate2 "
                                                              "Whisper folder")] = None,
    layout: Annotated[str, typer.Option(help="speaker ids from: auto, crema, lrw, grid, folder")] = "auto",
    jobs: Annotated[int, typer.Option(help="worker processes")] = max(1, min(4, (os.cpu_count() or 1))),
    min_face: Annotated[float, typer.Option(help="skip clips with a face in fewer frames than this")] = 0.9,
    test_fraction: Annotated[float, typer.Option(help="fraction of speakers held out for test.txt")] = 0.1,
    test_speaker: Annotated[Optional[list[str]], typer.Option(help="held-out speaker (repeatable); "
                                                                   "overrides --test-fraction")] = None,
    keep_audio: Annotated[bool, typer.Option(help="store the 16 kHz audio (for sample videos)")] = True,
    retry_failed: Annotated[bool, typer.Option(help="retry clips that failed in an earlier run")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Preprocess talking-face videos into training clips (crop, landmarks, audio embeddings, splits)."""
    _setup_logging(verbose)
    from dheads.engine.encoders import default_audio_config

    from .prepare import PrepareConfig
    from .prepare import prepare as run_prepare

    if encoder not in ("whisper", "sda"):
        _fail(f"--encoder must be whisper or sda, not {encoder!r}")
    try:
        cfg = PrepareConfig(size=size, audio=default_audio_config(encoder),
                            min_face_fraction=min_face, keep_audio=keep_audio, layout=layout,
                            test_fraction=test_fraction, test_speakers=tuple(test_speaker or ()))
        report = run_prepare(source, out, cfg, jobs=jobs, retry_failed=retry_failed, progress=progress,
                             encoder_path=str(encoder_path) if encoder_path else None)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for cid, reason in sorted(report.failed.items()):
        log.warning("skipped %s: %s", cid, reason)
    splits = ", ".join(f"{k} {len(v)}" for k, v in report.splits.items())
    log.info("%s: %d clips written, %d already there, %d skipped; %s", out, len(report.done),
             len(report.existing), len(report.failed), splits)


@app.command()
def fit(
    data: Annotated[Path, typer.Option(help="a folder written by `dh-train prepare`")],
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, last.pt, metrics, samples")],
    config: Annotated[Optional[str], typer.Option(help="preset (crema, lrw, tiny) or a .toml file; "
                                                       "default tiny; a resumed run keeps its recorded one")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. --set optim.lr=1e-4 "
                                                                    "(repeatable)")] = None,
    resume: Annotated[str, typer.Option(help="auto: continue OUT/last.pt where present, as the run recorded it "
                                             "(--set may change only its length and cadence, e.g. "
                                             "train.steps); no: a fresh run; or a checkpoint path")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if "
                                                       "available)")] = None,
    until: Annotated[Optional[int], typer.Option(help="stop after this step (resume later)")] = None,
    init: Annotated[Optional[Path], typer.Option(help="fine-tune: start at step 0 from this checkpoint's (EMA) "
                                                      "weights, any format dh-run opens; its model config must "
                                                      "match the run's; ignored when resuming")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar (a log line every 30 s when stderr is "
                                                "not a terminal)")] = True,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train (or resume) a model on prepared clips. Under torchrun, one process per GPU (DDP)."""
    _setup_logging(verbose)
    from .config import load_config, resumed_config
    from .train import fit as run_fit
    from .train import resolve_resume, saved_config

    try:  # the flags first: a bad one is one line, with nothing logged before it
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder (make one with `dh-train prepare`)")
        ckpt = resolve_resume(out, resume)
        given = load_config(config or "tiny", list(set_ or [])) if config is not None or ckpt is None else None
        # a resumed run continues as it recorded itself; --config/--set may not quietly make it another run
        recorded = saved_config(ckpt, required=given is None) if ckpt is not None else None
        cfg = given if recorded is None else resumed_config(recorded, list(set_ or []), given=given, where=str(ckpt))
        if init is not None and not init.exists():  # a file, or a dh-export bundle folder
            raise FileNotFoundError(f"--init {init}: no such checkpoint")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _threads(threads)
    try:
        result = run_fit(cfg, data, out, resume=ckpt, device=device, progress=progress, until=until, init=init)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if result.losses:
        log.info("steps %d..%d, loss %.4f -> %.4f; last checkpoint %s", result.start_step + 1, result.end_step,
                 result.losses[0], result.losses[-1], result.last_checkpoint or "(none this run)")


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="any checkpoint dh-run opens: ours, Lightning, the authors' "
                                               "TorchScript UNet, a bare state_dict")],
    data: Annotated[Path, typer.Option(help="a folder written by `dh-train prepare` (same audio encoder as the "
                                            "teacher); its training split is used")],
    out: Annotated[Path, typer.Option(help="folder: round_N/ runs and student.pt")],
    steps: Annotated[int, typer.Option(help="the student's DDIM steps (UNet calls per frame)")] = 4,
    rounds: Annotated[int, typer.Option(help="halvings: the first teacher runs (steps-1)*2^rounds+1 DDIM steps")] = 2,
    rollout: Annotated[float, typer.Option(help="fraction of samples that start from the student's own "
                                                "previous step")] = 0.5,
    sampler: Annotated[str, typer.Option(help="the teacher's steps and the student's: ddim (deterministic) or "
                                              "ddpm (ancestral; the student learns the mean of two)")] = "ddim",
    teacher_substeps: Annotated[int, typer.Option(help="the first round's teacher steps per student step: 2 "
                                                       "(Salimans & Ho), 4 or 8 (a finer teacher path, "
                                                       "that many times the teacher calls)")] = 2,
    spacing: Annotated[str, typer.Option(help="the student's timesteps: uniform (the authors' rule, ends on "
                                              "t = 0), trailing (Lin et al. 2024: 999, 749, 499, 249 for 4 "
                                              "steps, every call denoises) or karras; recorded as its default")
                       ] = "uniform",
    teacher_grid: Annotated[str, typer.Option(help="round 1's teacher steps: refined (the student grid refined "
                                                   "--teacher-substeps times) or own (the grid the teacher "
                                                   "samples on by default, e.g. a 13-step student's)")
                            ] = "refined",
    method: Annotated[str, typer.Option(help="progressive (regress on the teacher's steps) or dmd (one round: "
                                             "that regression plus distribution matching against the "
                                             "teacher, with a fake-score model trained alongside)")
                      ] = "progressive",
    dmd_weight: Annotated[float, typer.Option(help="--method dmd: the distribution-matching term's weight")] = 1.0,
    regression_weight: Annotated[float, typer.Option(help="--method dmd: the regression term's weight "
                                                          "(0: distribution matching alone)")] = 1.0,
    fake_lr: Annotated[float, typer.Option(help="--method dmd: the fake-score model's learning rate "
                                                "(0: optim.lr)")] = 0.0,
    config: Annotated[str, typer.Option(help="preset or .toml for the data/loss/optim/train sections "
                                             "(train.steps is per round); model and diffusion come from "
                                             "the teacher")] = "distill",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. --set train.steps=300 "
                                                                    "(repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="continue each round from OUT/round_N/last.pt where present")] = True,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if "
                                                       "available)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar (a log line every 30 s when stderr is "
                                                "not a terminal)")] = True,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Distil a teacher into a few-step DDIM or DDPM student (progressive distillation). Under torchrun: DDP."""
    _setup_logging(verbose)
    _require(checkpoint=teacher, data=data)
    _threads(threads)
    from dheads.engine.checkpoint import CheckpointError

    from .config import load_config
    from .distill import DistillConfig
    from .distill import distill as run_distill

    try:
        dcfg = DistillConfig(steps=steps, rounds=rounds, rollout=rollout, sampler=sampler,
                             teacher_substeps=teacher_substeps, spacing=spacing, teacher_grid=teacher_grid,
                             method=method, dmd_weight=dmd_weight, regression_weight=regression_weight,
                             fake_lr=fake_lr)
        result = run_distill(teacher, data, out, dcfg, load_config(config, list(set_ or [])), resume=resume,
                             device=device, progress=progress)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        _fail(str(e))
    log.info("student: %s (%s, %d %s steps)", result.student, sampler, steps, spacing)


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint (e.g. RUN/last.pt)")],
    data: Annotated[Path, typer.Option(help="a prepared folder: the identity frame and audio come from a clip")],
    out: Annotated[Path, typer.Option(help="mp4 to write: generated | real, with the clip's audio")],
    clip: Annotated[Optional[str], typer.Option(help="clip id (default: first test clip, else first train)")] = None,
    frames: Annotated[int, typer.Option(help="frames to generate")] = 25,
    sampler: Annotated[str, typer.Option(help="ddpm or ddim")] = "ddim",
    steps: Annotated[int, typer.Option(help="sampling steps")] = 20,
    raw: Annotated[bool, typer.Option(help="use the raw weights instead of the EMA weights")] = False,
    device: Annotated[str, typer.Option()] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Preview a checkpoint on a prepared clip."""
    _setup_logging(verbose)
    _require(checkpoint=checkpoint, data=data)
    _threads(threads)
    from dheads.engine.checkpoint import load_checkpoint

    from .train import write_preview

    try:
        ckpt = load_checkpoint(checkpoint)
        path = write_preview(ckpt, data, out, frames=frames, sampler=sampler, steps=steps, clip=clip,
                             ema=not raw, device=device, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    log.info("wrote %s", path)


@app.command()
def health(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint (e.g. RUN/last.pt)")],
    data: Annotated[Path, typer.Option(help="a prepared folder; its test clips are used (else its training clips)")],
    raw: Annotated[bool, typer.Option(help="check the raw weights instead of the EMA weights")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Can the model control the frame's colour? Exit 1 when the health check fails."""
    _setup_logging(verbose)
    from dheads.engine.checkpoint import load_checkpoint
    from dheads.engine.config import DiffusionConfig

    from .config import LossConfig
    from .dataset import ClipStore, FrameDataset
    from .diffusion import make_tables, schedule_for
    from .health import health_batch, log_report, measure

    try:
        ckpt = load_checkpoint(checkpoint)
        try:
            store = ClipStore(data, "test")
        except ValueError:
            store = ClipStore(data, "train")
        batch = health_batch(FrameDataset(store, ckpt.model, LossConfig()))
        report = measure(ckpt.build(ema=not raw), batch, make_tables(schedule_for(ckpt.diffusion or DiffusionConfig())))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    log_report(report, f"{checkpoint} ({store.split} clips)")
    typer.echo(report.summary())
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def rollouts(
    checkpoint: Annotated[Path, typer.Argument(help="the model whose own videos to write (e.g. a student)")],
    data: Annotated[Path, typer.Option(help="a prepared folder: DATA/rollouts/<clip>.npz is written for each "
                                            "training clip")],
    seed: Annotated[int, typer.Option(help="sampling seed (clip k uses seed + k)")] = 0,
    seconds: Annotated[float, typer.Option(help="rollout length; longer than a clip: its audio, then the other "
                                                "clips', and training uses the last frames (the most drifted). "
                                                "0: each clip's own length")] = 0.0,
    frame_noise: Annotated[Optional[str], typer.Option(help="fresh | repeat | a correlation in (0, 1) between "
                                                           "frames' noise (default: the checkpoint's)")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate every training clip with the model, for `--set data.motion_rollout_prob=P` in fit or distill."""
    _setup_logging(verbose)
    _require(checkpoint=checkpoint, data=data)
    _threads(threads)
    from dheads.engine.checkpoint import CheckpointError

    from .rollouts import write_rollouts

    try:
        written = write_rollouts(checkpoint, data, seed=seed, seconds=seconds, frame_noise=frame_noise,
                                 device=device)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        _fail(str(e))
    log.info("%d rollouts written under %s", len(written), data / "rollouts")


@app.command()
def anchor(
    checkpoint: Annotated[Path, typer.Argument(help="a dheads checkpoint (e.g. RUN/last.pt)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the anchored checkpoint to write")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Add the identity colour anchor to a trained model (no retraining): each frame's mean colour becomes
    the identity frame's, so the video cannot flicker or drift in colour (README "Colour and drift")."""
    _setup_logging(verbose)
    from dheads.engine.checkpoint import load_checkpoint, save_checkpoint, with_color_anchor

    if out.resolve() == checkpoint.resolve():
        _fail(f"output {out} is the input checkpoint; choose another path")
    try:
        anchored = with_color_anchor(load_checkpoint(checkpoint))
        save_checkpoint(out, anchored)
    except (ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} (color_anchor = identity)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dh-train`` console script."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="dh-train")


if __name__ == "__main__":
    main()
