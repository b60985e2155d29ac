"""The user docs say what is true: their commands run, their flags exist, their links and files exist.

Every fenced ``bash`` command in README.md, docs/*.md and benchmarks/results/README.md is classified by
``RULES`` (the first rule that matches): either ``run`` (executed here, cheaply: dh-run on the shipped
example with ``--max-seconds`` cut to 0.2 s, dh-eval on its video) or ``skip`` with a reason (an install,
a GPU, TensorRT, hours of training, a server, data the repository does not ship). A command no rule
matches fails the test: a new command in the docs must say how it is checked. Skipped dh-* and
``python -m dheads...`` commands still have each ``--flag`` they use looked up in their own ``--help``.
The README's quickstart itself runs in CI (``.ci/quickstart``); ``tests/test_quickstart.py`` checks it.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "results" / "README.md"]
BIN = Path(sys.executable).parent
EXAMPLES = "engine/assets/examples/"
SECONDS = "0.2"  # what an executed dh-run renders: 5 frames

# (pattern on the command, "run" | "skip", reason). First match wins.
RULES: list[tuple[str, str, str]] = [
    (r"^python3 -m venv .venv && ", "skip", "the quickstart's install + demo: CI runs it in a fresh clone (.ci/quickstart)"),
    (r"^make test$", "skip", "the test suite itself"),
    (r"^make gpu-check$", "skip", "needs a CUDA GPU"),
    (r"^pip install ", "skip", "installs packages from the registry"),
    (r"^dh-run engine/assets/examples/face\.png engine/assets/examples/speech\.wav -o out\.mp4$", "skip",
     "the quickstart's own dh-run: CI runs it whole (.ci/quickstart), tests/test_demo.py with -m slow"),
    (r"^dh-run engine/assets/examples/face\.png engine/assets/examples/speech\.wav (?!.*--engine)(?!.*--device cuda)",
     "run", "dh-run on the shipped example with the demo model"),
    (r"^dh-eval short\.mp4 ", "run", "dh-eval on the video the README's dh-run line makes"),
    (r"--device cuda|--backends [^ ]*tensorrt|tensorrt,|--precision fp16$", "skip", "needs a CUDA GPU (and TensorRT)"),
    (r"crema_script\.pt|audio_encoder\.pt|/data/CREMA-D|torchrun ", "skip",
     "the authors' released checkpoint / CREMA-D / several GPUs, which the repository does not ship"),
    (r"^dh-train (prepare|fit|distill|sample|rollouts|anchor|health) ", "skip", "training: minutes to hours"),
    (r"^dh-export ", "skip", "exports a checkpoint that training makes (minutes; int8 calibration renders video)"),
    (r"^dh-run .*--engine (runs/|crema|tiny_bundle|student_bundle)", "skip", "needs a model that training or dh-export makes"),
    (r"^dh-bench ", "skip", "a benchmark: minutes on 2 CPU cores (tests/test_bench.py runs small ones)"),
    (r"^dh-frontier ", "skip", "a sampler sweep: hours on 2 CPU cores (tests/test_frontier.py runs a small one)"),
    (r"^dh-eval ", "skip", "needs videos the docs' earlier steps make (tests/test_metrics.py covers dh-eval)"),
    (r"^dh-serve", "skip", "starts a server that runs until stopped (tests/test_serve*.py drive it)"),
    (r"^python -m dheads\.benchmarks\.(heldout_study|portraits)", "skip",
     "renders many videos: tens of minutes (tests/test_heldout_study.py, test_portraits.py run small ones)"),
    (r"(^|&& )(OMP_NUM_THREADS=1 )?python -m dheads\.benchmarks\.serve_load", "skip",
     "a load test: minutes (tests/test_serve_load.py checks its bookkeeping)"),
    (r"^export DH_SERVE_TOKEN=", "skip", "reads a secret of the deployment"),
    (r"^(mkdir -p runs/teacher && )?git archive ", "skip", "extracts a past demo model for a training recipe"),
    (r"^(\(|for )", "skip", "shell plumbing of a training recipe (builds a clip list from ../shared/data)"),
    (r"^curl .*http://127\.0\.0\.1:8000/", "skip", "needs a running dh-serve (tests/test_serve_production.py renders through /v1/render)"),
    (r"^(C|S)=", "skip", "a shell variable of a training recipe"),
]


def _commands(path: Path) -> list[str]:
    """The logical lines of the file's ```bash blocks: continuations joined, comments dropped."""
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _classify(cmd: str) -> tuple[str, str]:
    for pattern, action, reason in RULES:
        if re.search(pattern, cmd):
            return action, reason
    raise AssertionError(f"no rule in tests/test_docs.py says how to check this documented command: {cmd}")


ALL = [(p.relative_to(REPO).as_posix(), c) for p in DOCS for c in _commands(p)]


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    assert len(ALL) > 30  # the docs have commands, and the parser found them
    unknown = []
    for where, cmd in ALL:
        try:
            _classify(cmd)
        except AssertionError as e:
            unknown.append(f"{where}: {e}")
    assert not unknown, "\n".join(unknown)
    assert any(_classify(c)[0] == "run" for _, c in ALL)


@functools.lru_cache(maxsize=None)
def _help(argv: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb", "NO_COLOR": "1"}
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(argv)} --help: exit {proc.returncode}\n{proc.stderr[-1500:]}"
    return proc.stdout


def _program(tokens: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """The argv prefix whose --help lists the flags of ``tokens`` (a dh-* command or python -m dheads.X)."""
    if tokens[0].startswith("dh-"):
        exe = str(BIN / tokens[0])
        if tokens[0] == "dh-train" and len(tokens) > 1:
            return (exe, tokens[1]), tokens[2:]
        return (exe,), tokens[1:]
    if tokens[:2] == ["python", "-m"] and tokens[2].startswith("dheads."):
        return (sys.executable, "-m", tokens[2]), tokens[3:]
    return None


def test_flags_of_documented_commands_exist():
    """Each --flag of a documented dh-* / python -m dheads command appears in that command's --help."""
    uses = []
    for where, cmd in ALL:
        for part in cmd.split("&&"):
            try:
                tokens = shlex.split(part.strip().removeprefix("OMP_NUM_THREADS=1 "))
            except ValueError:
                continue
            found = _program(tokens) if tokens else None
            if found is not None:
                uses.append((where, cmd, *found))
    with ThreadPoolExecutor(2) as pool:  # the --help calls are independent: two at a time
        list(pool.map(_help, {argv for _, _, argv, _ in uses}))
    missing = []
    for where, cmd, argv, rest in uses:
        text = _help(argv)
        for tok in rest:
            flag = tok.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][a-z0-9-]*", flag) and not re.search(re.escape(flag) + r"(?![\w-])", text):
                missing.append(f"{where}: {' '.join(Path(a).name for a in argv)} has no {flag} ({cmd[:80]})")
    assert not missing, "\n".join(missing)


def _run_documented(cmd: str, cwd: Path) -> str:
    """Run one `run` command in ``cwd`` (example paths made absolute, dh-run cut to SECONDS); "" when it worked."""
    argv = shlex.split(cmd.replace(EXAMPLES, f"{REPO}/{EXAMPLES}"))
    if argv[0] == "dh-run":
        if "--max-seconds" in argv:
            argv[argv.index("--max-seconds") + 1] = SECONDS
        else:
            argv += ["--max-seconds", SECONDS]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    if proc.returncode != 0:
        return f"{cmd}\n{proc.stderr[-2000:]}"
    if argv[0] == "dh-run" and (cwd / argv[argv.index("-o") + 1]).stat().st_size < 1000:
        return f"{cmd}: the mp4 is empty"
    return ""


def test_documented_cheap_commands_run(tmp_path):
    """The `run` commands in a scratch folder: the dh-run lines two at a time, then dh-eval on their video."""
    runs = [c for _, c in ALL if _classify(c)[0] == "run"]
    first = [c for c in runs if not c.startswith("dh-eval")]
    then = [c for c in runs if c.startswith("dh-eval")]
    assert first and then
    with ThreadPoolExecutor(2) as pool:
        errors = [e for e in pool.map(lambda c: _run_documented(c, tmp_path), dict.fromkeys(first)) if e]
    errors += [e for e in (_run_documented(c, tmp_path) for c in then) if e]
    assert not errors, "\n".join(errors)


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_python_examples_run(tmp_path):
    """The README's Python API example and docs/running.md's (one process, one namespace, in order),
    with the example's 1.0 s of speech cut to 0.2 s and its mp4 written to a scratch folder."""
    blocks = _python_blocks(REPO / "README.md") + _python_blocks(REPO / "docs" / "running.md")[:2]
    assert len(blocks) == 3 and "TalkingHead.open()" in blocks[0] and "render_batch" in blocks[2]
    code = "\n".join(blocks).replace("max_seconds=1.0", f"max_seconds={SECONDS}")
    for name in ('"out.mp4"', '"a.mp4"', '"b.mp4"'):
        code = code.replace(name, repr(str(tmp_path / name.strip('"'))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 frames" in proc.stdout and "(64, 64, 3)" in proc.stdout, proc.stdout
    for name in ("out.mp4", "a.mp4", "b.mp4"):
        assert (tmp_path / name).stat().st_size > 1000, name


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_links_in_the_docs_point_at_files_and_headings_that_exist():
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _expand(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (nested braces are not used in the docs)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


REPO_PATH = re.compile(r"(?:engine|export|training|benchmarks|serve|tests|docs|\.ci)/[\w./{},*-]*")


def test_repository_paths_named_in_the_docs_exist():
    """Every `path` in backticks that starts with a top-level folder of the repository matches a file."""
    missing = []
    for path in DOCS:
        for code in re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")):
            if not REPO_PATH.fullmatch(code):
                continue
            for p in _expand(code):
                if not glob.glob(str(REPO / p)):
                    missing.append(f"{path.relative_to(REPO)}: {p}")
    assert not missing, "\n".join(missing)


def test_results_index_lists_every_result_and_only_existing_ones():
    results = REPO / "benchmarks" / "results"
    index = (results / "README.md").read_text(encoding="utf-8")
    listed: set[Path] = set()
    for code in re.findall(r"`([^`\n]+\.(?:json|md|png|jpg)|[^`\n]+\})`", index):
        for p in _expand(code):
            hits = [Path(h) for h in glob.glob(str(results / p))]
            assert hits, f"benchmarks/results/README.md lists {p}, which does not exist"
            listed.update(hits)
    on_disk = {p for p in results.rglob("*") if p.is_file() and p.name != "README.md"}
    unlisted = sorted(str(p.relative_to(results)) for p in on_disk - listed)
    assert not unlisted, f"results not in benchmarks/results/README.md: {unlisted}"
    dates = re.findall(r"^\| (\d{4}-\d\d-\d\d) \|", index, flags=re.M)
    assert dates and dates == sorted(dates, reverse=True), "the index is newest first"
