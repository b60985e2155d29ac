"""What dh-export takes as its source, said exactly: a checkpoint file, or (with --precision int8) a bundle folder.
A bundle folder without int8, another folder and a symlink loop each get a line that names what they are."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from dheads.export.cli import app

runner = CliRunner()


def _error(args) -> str:
    r = runner.invoke(app, [str(a) for a in args], prog_name="dh-export")
    assert r.exit_code == 2, (r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_bundle_folder_without_int8_is_named_as_a_bundle(tmp_path):
    bundle = tmp_path / "demo"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert _error([bundle, "-o", tmp_path / "out"]) == (
        f"dh-export: error: {bundle}: an export bundle, not a checkpoint; dh-export makes a bundle from a checkpoint "
        "file (ours, crema_script.pt, Lightning, a UNet state_dict), or adds int8 to a bundle with --precision int8")
    assert not (tmp_path / "out").exists()


def test_another_folder_is_a_directory_not_a_checkpoint(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    assert _error([folder, "-o", tmp_path / "out", "--precision", "fp32"]) == (
        f"dh-export: error: {folder}: is a directory, not a checkpoint file (with --precision int8 it may be an "
        "export bundle folder)")


def test_a_symlink_loop_is_reported_as_one(tmp_path):
    loop = tmp_path / "loop.pt"
    os.symlink(loop, loop)
    assert _error([loop, "-o", tmp_path / "out"]) == (
        f"dh-export: error: {loop}: symlink loop (the link leads back to itself), not a checkpoint")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    os.symlink(b, a)
    os.symlink(a, b)
    assert _error([a, "-o", tmp_path / "out"]) == (
        f"dh-export: error: {a}: symlink loop (the link leads back to itself), not a checkpoint")
    assert _error([tmp_path / "missing.pt", "-o", tmp_path / "out"]) == (
        f"dh-export: error: {tmp_path / 'missing.pt'}: no such file")
