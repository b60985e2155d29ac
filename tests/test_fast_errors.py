"""Every dh-* command answers --help, a bad flag or a missing file before torch is imported, and its help fits an
80-column terminal.

Each case runs the command's entry point in a fresh interpreter that reports, when the command exits, its exit
code, whether ``torch`` is in ``sys.modules`` (a module once imported stays there, so False at exit means it was
never imported, in particular not when the error was raised) and the wall time from the start of the import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
module, prog = sys.argv[1], sys.argv[2]
sys.argv = [prog] + sys.argv[3:]
import importlib
code = 0
try:
    importlib.import_module(module).main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush()
sys.stderr.write("\nPROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules,
                                           "seconds": time.perf_counter() - t0}) + "\n")
"""

COMMANDS = {  # prog: entry module (pyproject.toml [project.scripts])
    "dh-run": "dheads.engine.cli",
    "dh-export": "dheads.export.cli",
    "dh-bench": "dheads.benchmarks.cli",
    "dh-eval": "dheads.benchmarks.eval_cli",
    "dh-frontier": "dheads.benchmarks.frontier_cli",
    "dh-serve": "dheads.serve.cli",
}

SAMPLER_LINE = "unknown sampler 'nope'; choose one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"
NOISE_LINE = "must be one of fresh, repeat or a correlation between 0 and 1 (e.g. 0.8), got '2'"
BAD = {  # (prog, args) -> the one line on stderr (exit 2)
    ("dh-run", ("nope.png", "speech.wav")): "dh-run: error: no such file: nope.png",
    ("dh-run", ("face.png", "nope.wav", "--steps", "0")): "dh-run: error: Invalid value for --steps: must be at least 1, got 0",
    ("dh-run", ("f.png", "s.wav", "--sampler", "nope")): f"dh-run: error: Invalid value for --sampler: {SAMPLER_LINE}",
    ("dh-run", ("f.png", "s.wav", "--spacing", "x")):
        "dh-run: error: Invalid value for --spacing: must be one of uniform, karras, trailing, got 'x'",
    ("dh-run", ("f.png", "s.wav", "--precision", "fp64")):
        "dh-run: error: precision must be one of fp32, fp16, bf16, int8, got 'fp64'",
    ("dh-run", ("f.png", "s.wav", "--frame-noise", "2")): f"dh-run: error: Invalid value for --frame-noise: {NOISE_LINE}",
    ("dh-run", ("f.png", "s.wav", "--warm-steps", "5", "--steps", "4")):
        "dh-run: error: Invalid value for --warm-steps: must be in 0..steps (4), got 5",
    ("dh-run", ("f.png", "s.wav", "--preset", "fast")):
        "dh-run: error: Invalid value for --preset: unknown preset 'fast'; choose one of quality, realtime",
    ("dh-export", ("nope.pt",)): "dh-export: error: nope.pt: no such file",
    ("dh-export", ("nope.pt", "--steps", "0")): "dh-export: error: --steps must be at least 1, got 0",
    ("dh-export", ("nope.pt", "--spacing", "x")):
        "dh-export: error: --spacing must be one of uniform, karras, trailing, got 'x'",
    ("dh-export", ("nope.pt", "--precision", "fp64")):
        "dh-export: error: --precision must be one of fp16, fp32, int8, got 'fp64'",
    ("dh-export", ("nope.pt", "--frame-noise", "2")): f"dh-export: error: --frame-noise {NOISE_LINE}",
    ("dh-bench", ("--steps", "0")): "dh-bench: error: Invalid value for --steps: must be at least 1, got 0",
    ("dh-frontier", ("nope.mpg",)): "dh-frontier: error: no such file: nope.mpg",
    ("dh-frontier", ("nope.mpg", "--samplers", "ddpm,nope")): f"dh-frontier: error: {SAMPLER_LINE}",
}


def probe(prog: str, *args: str, cwd, columns: int | None = None) -> tuple[dict, str, str]:
    env = dict(os.environ)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    r = subprocess.run([sys.executable, "-c", PROBE, COMMANDS[prog], prog, *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    head, _, tail = r.stderr.rpartition("\nPROBE ")
    assert tail, r.stderr
    return json.loads(tail), r.stdout, head.strip()


@pytest.mark.parametrize("prog, args", list(BAD), ids=[" ".join((p, *a)) for p, a in BAD])
def test_bad_input_is_one_line_before_torch(tmp_path, prog, args):
    got, out, err = probe(prog, *args, cwd=tmp_path)
    print(f"{prog} {' '.join(args)}: {got['seconds']:.2f} s")
    assert err.splitlines() == [BAD[prog, args]] and out == ""
    assert got["code"] == 2 and got["torch"] is False


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_help_before_torch_and_in_80_columns(tmp_path, prog):
    """--help exits 0 without torch; at 80 columns no line is longer, none is cut ('…'), and every option
    the command declares is named."""
    import importlib

    import typer.main

    got, out, err = probe(prog, "--help", cwd=tmp_path, columns=80)
    print(f"{prog} --help: {got['seconds']:.2f} s")
    assert got["code"] == 0 and got["torch"] is False, err
    assert "Usage:" in out
    cut = [line for line in out.splitlines() if "…" in line or len(line) > 80]
    assert cut == [], cut
    command = typer.main.get_command(importlib.import_module(COMMANDS[prog]).app)
    missing = [o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")
               and o not in out]
    assert missing == [], missing


def test_importing_a_cli_imports_no_torch():
    code = "import sys, " + ", ".join(COMMANDS.values()) + "; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


TRAIN_COMMANDS = ("prepare", "fit", "distill", "sample", "health", "rollouts", "anchor")


@pytest.mark.parametrize("sub", TRAIN_COMMANDS)
def test_dh_train_help_before_torch_and_in_80_columns(tmp_path, sub):
    """dh-train's commands too: --help without torch, no line over 80 columns or cut, every option named."""
    import typer.main

    from dheads.training import cli

    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-c", PROBE, "dheads.training.cli", "dh-train", sub, "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    got = json.loads(r.stderr.rpartition("\nPROBE ")[2])
    assert got["code"] == 0 and got["torch"] is False, r.stderr
    cut = [line for line in r.stdout.splitlines() if "…" in line or len(line) > 80]
    assert cut == [], cut
    command = typer.main.get_command(cli.app).commands[sub]
    missing = [o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")
               and o not in r.stdout]
    assert missing == [], missing
