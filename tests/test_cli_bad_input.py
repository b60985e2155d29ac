"""Hostile inputs to dh-run, dh-export and dh-bench: each is one exact line on stderr, exit 2, nothing left behind.

The cases of the fresh-clone review: bad flag values (Typer's usage box before), paths that would destroy an
input or cannot be written, numbers out of range, corrupt audio, a bundle whose manifest lies, a damaged
checkpoint; and stop signals (SIGTERM, SIGHUP, SIGINT during start-up), which must not leave a ``.part``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from _small_bundle import small_export
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.config import SMALL
from dheads.engine.encoders import default_audio_config
from dheads.engine.model import DiffusedHeadsUNet

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """A folder of inputs, good and bad, made once (the tests check that it does not change)."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(shared_data / "faces" / "astronaut_512.png", d / "face.png")
    shutil.copy(shared_data / "speech" / "cmu_arctic_a0007.wav", d / "speech.wav")
    torch.manual_seed(0)
    net = DiffusedHeadsUNet(dataclasses.replace(SMALL, audio_dim=384))
    save_checkpoint(d / "small.pt", checkpoint_from_model(net, default_audio_config("whisper")))
    obj = torch.load(d / "small.pt", weights_only=True)
    del obj["model_config"]
    torch.save(obj, d / "no_config.pt")
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("not a folder\n")
    (d / "truncated.png").write_bytes((d / "face.png").read_bytes()[:3000])
    speech, rate = sf.read(d / "speech.wav", dtype="float32")
    for name, value in (("inf.wav", np.inf), ("nan.wav", np.nan)):
        bad = speech.copy()
        bad[100] = value
        sf.write(d / name, bad, rate, subtype="FLOAT")
    return d


@pytest.fixture(scope="module")
def lying_bundle(request, tmp_path_factory) -> Path:
    """The small export with its manifest's image_size edited (64, the ONNX takes 32)."""
    src = small_export(request.config, tmp_path_factory)[1].out_dir
    dst = tmp_path_factory.mktemp("lying") / "bundle"
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data["model"]["image_size"] = 64
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _listing(*dirs: Path) -> dict[str, list[str]]:
    return {str(d): sorted(p.name for p in d.iterdir()) for d in dirs}


def _one_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


LONG = "a" * 245 + ".mp4"  # 249 bytes: fits a file name, not its ".<name>.XXXXXXXX.part" temporary


def _run_cases(i: Path, out: Path) -> dict[str, tuple[list, str]]:
    face, wav, eng = i / "face.png", i / "speech.wav", i / "small.pt"
    ok = [face, wav, "--engine", eng, "-o", out / "out.mp4"]
    return {
        "steps 0": ([*ok, "--steps", "0"], "Invalid value for --steps: must be at least 1, got 0"),
        "steps -1": ([*ok, "--steps", "-1"], "Invalid value for --steps: must be at least 1, got -1"),
        "steps 100000": ([*ok, "--steps", "100000"],
                         "Invalid value for --steps: must be at most 1000 (the model's diffusion timesteps), got 100000"),
        "steps abc": ([*ok, "--steps", "abc"],
                      "Invalid value for '--steps': Input should be a valid integer, unable to parse string as an "
                      "integer"),
        "sampler foo": ([*ok, "--sampler", "foo"],
                        "Invalid value for --sampler: unknown sampler 'foo'; choose one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"),
        "crop centre": ([*ok, "--crop", "centre"], "Invalid value for --crop: must be 'auto' or 'none', got 'centre'"),
        "spacing log": ([*ok, "--spacing", "log"], "Invalid value for --spacing: must be one of uniform, karras, trailing, got 'log'"),
        "frame-noise same": ([*ok, "--frame-noise", "same"],
                             "Invalid value for --frame-noise: must be one of fresh, repeat or a correlation between 0 and 1 "
                             "(e.g. 0.8), got 'same'"),
        "seed 2**70": ([*ok, "--seed", str(2**70)], f"Invalid value for --seed: must be in 0..2**64-1, got {2**70}"),
        "max-seconds nan": ([*ok, "--max-seconds", "nan"],
                            "Invalid value for --max-seconds: must be a positive number of seconds, got nan"),
        "max-seconds -3": ([*ok, "--max-seconds", "-3"],
                           "Invalid value for --max-seconds: must be a positive number of seconds, got -3.0"),
        "unknown option": ([*ok, "--frobnicate"], "No such option: --frobnicate (Possible options: --frame)"),
        "output is the face": ([face, wav, "--engine", eng, "-o", face],
                               f"output {face} is the input {face}; writing it would destroy the input, choose "
                               "another output path"),
        "output is the audio": ([face, wav, "--engine", eng, "-o", wav],
                                f"output {wav} is the input {wav}; writing it would destroy the input, choose "
                                "another output path"),
        "output under a file": ([face, wav, "--engine", eng, "-o", i / "a_file" / "out.mp4"],
                                f"output {i / 'a_file' / 'out.mp4'}: {i / 'a_file'} is a file, not a directory"),
        "output name too long": ([face, wav, "--engine", eng, "-o", out / LONG],
                                 "output file name is too long (249 bytes; at most 240 here, room is needed for the "
                                 "temporary .part name)"),
        "face is a folder": ([i / "a_folder", wav, "--engine", eng, "-o", out / "out.mp4"],
                             f"{i / 'a_folder'} is a directory; give a photo or a video of one face"),
        "wav as face": ([wav, wav, "--engine", eng, "-o", out / "out.mp4"],
                        f"cannot read image {wav} (it holds no picture or video stream)"),
        "truncated png": ([i / "truncated.png", wav, "--engine", eng, "-o", out / "out.mp4"],
                          f"cannot read image {i / 'truncated.png'} (corrupt or unsupported format)"),
        "audio with inf": ([face, i / "inf.wav", "--engine", eng, "-o", out / "out.mp4"],
                           f"{i / 'inf.wav'}: 1 of 64000 samples are NaN or infinite (a corrupt float file); "
                           "re-encode it or give another file"),
        "audio with nan": ([face, i / "nan.wav", "--engine", eng, "-o", out / "out.mp4"],
                           f"{i / 'nan.wav'}: 1 of 64000 samples are NaN or infinite (a corrupt float file); "
                           "re-encode it or give another file"),
        "precision fp8": ([*ok, "--precision", "fp8"], "precision must be one of fp32, fp16, bf16, int8, got 'fp8'"),
        "device gpu": ([*ok, "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        "checkpoint without model_config": ([face, wav, "--engine", i / "no_config.pt", "-o", out / "out.mp4"],
                                            f"{i / 'no_config.pt'}: dheads checkpoint is missing model_config "
                                            "(damaged or edited); save it again with save_checkpoint; or pass a "
                                            ".plan, .onnx or export bundle"),
    }


RUN_CASES = ["steps 0", "steps -1", "steps 100000", "steps abc", "sampler foo", "crop centre", "spacing log", "frame-noise same", "seed 2**70",
             "max-seconds nan", "max-seconds -3", "unknown option", "output is the face", "output is the audio",
             "output under a file", "output name too long", "face is a folder", "wav as face", "truncated png",
             "audio with inf", "audio with nan", "precision fp8", "device gpu", "checkpoint without model_config"]


@pytest.mark.parametrize("case", RUN_CASES)
def test_dh_run_bad_input_is_one_line_exit_2_nothing_written(inputs, tmp_path, case):
    from dheads.engine.cli import app

    out = tmp_path / "out"
    out.mkdir()
    args, message = _run_cases(inputs, out)[case]
    before = _listing(inputs, out)
    r = runner.invoke(app, [str(a) for a in args], prog_name="dh-run")
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    assert _one_line(r) == f"dh-run: error: {message}"
    assert _listing(inputs, out) == before
    assert (inputs / "face.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the input is intact


def test_dh_run_bundle_whose_manifest_disagrees_with_its_onnx(inputs, lying_bundle, tmp_path):
    from dheads.engine.cli import app

    r = runner.invoke(app, [str(inputs / "face.png"), str(inputs / "speech.wav"), "--engine", str(lying_bundle),
                            "-o", str(tmp_path / "out.mp4")], prog_name="dh-run")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _one_line(r) == (f"dh-run: error: {lying_bundle / 'unet.onnx'}: x_t has shape ['batch', 3, 32, 32] but "
                            "the manifest's model config gives [-1, 3, 64, 64]; the manifest does not describe this "
                            "ONNX, re-export with dh-export")
    assert list(tmp_path.iterdir()) == []


def test_dh_export_checkpoint_without_model_config(inputs, tmp_path):
    from dheads.export.cli import app

    r = runner.invoke(app, [str(inputs / "no_config.pt"), "-o", str(tmp_path / "bundle")], prog_name="dh-export")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _one_line(r) == (f"dh-export: error: {inputs / 'no_config.pt'}: dheads checkpoint is missing "
                            "model_config (damaged or edited); save it again with save_checkpoint")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "Invalid value for --steps: must be at least 1, got 0"),
    (["--model", "nope"], "Invalid value for --model: choose one of small, crema, demo"),
    (["--backends", "foo"], "Invalid value for --backends: foo given; use a comma list of pytorch, torch-compile, "
                            "onnxruntime, tensorrt, openvino"),
])
def test_dh_bench_bad_flag_is_one_line_exit_2(tmp_path, args, message):
    from dheads.benchmarks.cli import app

    r = runner.invoke(app, [*args, "--out", str(tmp_path / "results")], prog_name="dh-bench")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _one_line(r) == f"dh-bench: error: {message}"
    assert list(tmp_path.iterdir()) == []


# -- stop signals: a real process, its stderr and exit status ---------------------------------------------------

def _start(inputs: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dheads.engine.cli", str(inputs / "face.png"),
                             str(inputs / "speech.wav"), "--engine", str(inputs / "small.pt"), "-o", str(out),
                             *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"dh-run ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_signal_while_writing_leaves_no_part_file(inputs, tmp_path, sig):
    """The signal comes just after the .part appears (the first frame's write), with 99 frames of 20 steps to go:
    always before the mp4 is whole, so exactly the interrupt's exit, its one line and no file.

    A signal once the mp4 is whole and renamed (which this test cannot reach) leaves it there, complete: the exit is
    128 + signal with the one line while dh-run still runs (its summary), or, once the command has returned and the
    process is exiting, the signal's own default action (a shell reads 128 + signal too). Never a .part or exit 1."""
    out = tmp_path / "out.mp4"
    proc = _start(inputs, out, "--steps", "20")
    _wait_for(lambda: any(p.name.endswith(".part") for p in tmp_path.iterdir()), proc, "the .part file")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    # besides the periodic progress lines (stderr is not a terminal here), exactly the one error line
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("INFO dheads.run.progress: frames ")]
    assert lines == [f"dh-run: error: interrupted by {signal.Signals(sig).name}"]
    assert list(tmp_path.iterdir()) == []


def test_stop_signal_while_the_encoder_thread_starts(inputs, tmp_path, monkeypatch):
    """CI once got exit 1 from the test above: SIGHUP came while ``Thread.start()`` waited for the new mp4 encoder
    thread to run (a busy runner), and abort() then asked ``join()`` of a thread not yet seen running, whose
    RuntimeError replaced the interrupt (a traceback, the .part left). Here that thread signals the main thread
    itself, then runs 0.2 s later."""
    from dheads.engine.cli import app

    bootstrap = threading.Thread._bootstrap

    def late(self):
        if self.name.startswith("mp4-"):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)
            time.sleep(0.2)
        bootstrap(self)

    monkeypatch.setattr(threading.Thread, "_bootstrap", late)
    r = runner.invoke(app, [str(inputs / "face.png"), str(inputs / "speech.wav"), "--engine", str(inputs / "small.pt"),
                            "-o", str(tmp_path / "out.mp4"), "--steps", "1"], prog_name="dh-run")
    assert r.exit_code == 128 + signal.SIGHUP, (r.stderr, r.exception)
    assert _one_line(r) == "dh-run: error: interrupted by SIGHUP"
    assert list(tmp_path.iterdir()) == []
    end = time.monotonic() + 10  # the late thread runs, takes the _STOP it was left and ends
    while any(t.name.startswith("mp4-") for t in threading.enumerate()) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("mp4-")]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the engine loading")
def test_sigint_during_start_up_is_one_line_exit_130(inputs, tmp_path):
    """SIGINT once torch is being loaded (the command has started; nothing is written yet)."""
    proc = _start(inputs, tmp_path / "out.mp4")
    maps = Path(f"/proc/{proc.pid}/maps")
    _wait_for(lambda: "libtorch" in maps.read_text(), proc, "torch to load")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.splitlines() == ["dh-run: error: interrupted by SIGINT"]
    assert list(tmp_path.iterdir()) == []


def test_a_stop_signal_swallowed_on_the_way_still_stops_the_run(inputs, tmp_path, monkeypatch):
    """A library's bare ``except:`` (torch's import chain, say) that eats the signal's exception must not let
    the run go on to write its video and exit 0: the command checks again before and during the frames."""
    from dheads.engine.cli import app
    from dheads.engine.pipeline import TalkingHead

    real_open = TalkingHead.open.__func__

    def open_and_swallow(cls, *args, **kwargs):
        head = real_open(cls, *args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here, in the main thread, and its exception is eaten below
        except BaseException:
            pass
        return head

    monkeypatch.setattr(TalkingHead, "open", classmethod(open_and_swallow))
    r = runner.invoke(app, [str(inputs / "face.png"), str(inputs / "speech.wav"), "--engine", str(inputs / "small.pt"),
                            "-o", str(tmp_path / "out.mp4"), "--steps", "2"], prog_name="dh-run")
    assert r.exit_code == 128 + signal.SIGTERM, (r.stderr, r.exception)
    assert _one_line(r) == "dh-run: error: interrupted by SIGTERM"
    assert list(tmp_path.iterdir()) == []


def test_truncated_png_prints_no_native_libpng_line(inputs):
    """libpng writes "libpng error: ..." to file descriptor 2 itself; CliRunner cannot see that, a process can."""
    code = ("import sys\nfrom dheads.engine.image import ImageError, read_rgb\n"
            f"try:\n    read_rgb({str(inputs / 'truncated.png')!r})\nexcept ImageError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot read image {inputs / 'truncated.png'} (corrupt or unsupported format)"
    assert proc.stderr == ""
