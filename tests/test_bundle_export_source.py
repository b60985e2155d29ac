"""What dh-export takes as its source: a checkpoint file, or a bundle folder (re-exported from the weights read back
from its ONNX; with --precision int8, copied with int8 added). Another folder, a bundle whose ONNX was swapped and a
symlink loop each get one line that names what they are."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _small_bundle import small_export
from dheads.engine.bundle import read_manifest, sha256_file
from dheads.engine.checkpoint import load_checkpoint
from dheads.export.cli import app

runner = CliRunner()


def _error(args) -> str:
    r = runner.invoke(app, [str(a) for a in args], prog_name="dh-export")
    assert r.exit_code == 2, (r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory) -> Path:
    return small_export(request.config, tmp_path_factory)[1].out_dir


def test_a_bundle_folder_is_re_exported_from_its_weights(bundle, tmp_path):
    """The bundle's weights read back (checked against ONNX Runtime) and exported again: the new bundle holds the
    same weights, bit for bit, and names the ONNX it was made from."""
    out = tmp_path / "again"
    r = runner.invoke(app, [str(bundle), "-o", str(out), "--precision", "fp32", "--no-tensorrt", "--seed", "0"],
                      prog_name="dh-export")
    assert r.exit_code == 0, (r.stderr, r.exception)
    man, src = read_manifest(out), read_manifest(bundle)
    assert (man.source_name, man.source_kind) == (f"{bundle.name}/unet.onnx", "bundle")
    assert man.source_sha256 == src.file("unet.onnx").sha256 == sha256_file(bundle / "unet.onnx")
    assert man.model == src.model and man.diffusion == src.diffusion and man.audio == src.audio
    assert man.file("unet.onnx").sha256 == sha256_file(out / "unet.onnx")  # the rewritten manifest still verifies
    back, original = load_checkpoint(out), load_checkpoint(bundle)
    assert all(torch.equal(back.state_dict[k], v) for k, v in original.state_dict.items())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "unet.onnx"]


def test_a_bundle_folder_whose_onnx_was_swapped_is_refused(bundle, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    (swapped / "unet.onnx").write_bytes(b"another model")
    record = read_manifest(bundle).file("unet.onnx")
    assert _error([swapped, "-o", tmp_path / "out", "--no-tensorrt"]) == (
        f"dh-export: error: {swapped / 'unet.onnx'}: 13 bytes, but the manifest records {record.bytes} bytes (sha256 "
        f"{record.sha256[:12]}); the file was replaced or damaged, re-export with dh-export")
    assert not (tmp_path / "out").exists()


def test_another_folder_is_a_directory_not_a_checkpoint(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    assert _error([folder, "-o", tmp_path / "out", "--precision", "fp32"]) == (
        f"dh-export: error: {folder}: is a directory but not an export bundle (no manifest.json); dh-export takes a "
        "checkpoint file (ours, crema_script.pt, Lightning, a UNet state_dict) or a bundle folder")
    assert not (tmp_path / "out").exists()


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
