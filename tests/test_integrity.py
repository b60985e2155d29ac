"""A bundle runs only the files its manifest records: a swapped or damaged ``unet.onnx`` is one line naming the
file, expected vs found, before anything runs (dh-run exits 2 and writes nothing). Size is checked on every open;
sha256 when the size matches, remembered by (path, size, mtime) so re-opening costs a stat."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _small_bundle import small_export
from dheads.engine import bundle as bundle_mod
from dheads.engine.bundle import BundleError, read_manifest, verify_file
from dheads.engine.checkpoint import CheckpointError, load_checkpoint

runner = CliRunner()
DEMO_ONNX = Path(bundle_mod.__file__).parent / "assets" / "demo" / "unet.onnx"


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory) -> Path:
    return small_export(request.config, tmp_path_factory)[1].out_dir


@pytest.fixture()
def copied(bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _dh_run(engine: Path, out: Path, shared_data: Path):
    from dheads.engine.cli import app

    return runner.invoke(app, [str(shared_data / "faces" / "astronaut_512.png"),
                               str(shared_data / "speech" / "cmu_arctic_a0007.wav"), "--engine", str(engine),
                               "-o", str(out)], prog_name="dh-run")


def test_dh_run_refuses_a_bundle_whose_unet_onnx_was_swapped(copied, tmp_path, shared_data):
    record = read_manifest(copied).file("unet.onnx")
    shutil.copyfile(DEMO_ONNX, copied / "unet.onnx")  # another model's graph (the 64 px demo)
    out = tmp_path / "out"
    out.mkdir()
    r = _dh_run(copied, out / "x.mp4", shared_data)
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert r.stderr.splitlines() == [
        f"dh-run: error: {copied / 'unet.onnx'}: {DEMO_ONNX.stat().st_size} bytes, but the manifest records "
        f"{record.bytes} bytes (sha256 {record.sha256[:12]}); the file was replaced or damaged, re-export with "
        "dh-export"]
    assert list(out.iterdir()) == []


def test_a_same_size_change_is_caught_by_its_sha256(copied, tmp_path, shared_data):
    record = read_manifest(copied).file("unet.onnx")
    data = bytearray((copied / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (copied / "unet.onnx").write_bytes(bytes(data))
    found = bundle_mod.sha256_file(copied / "unet.onnx")
    line = (f"{copied / 'unet.onnx'}: sha256 {found[:12]}, but the manifest records {record.sha256[:12]} (same size, "
            f"{record.bytes} bytes); the file was replaced or damaged, re-export with dh-export")
    out = tmp_path / "out"
    out.mkdir()
    r = _dh_run(copied, out / "x.mp4", shared_data)
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert r.stderr.splitlines() == [f"dh-run: error: {line}"]
    assert list(out.iterdir()) == []
    with pytest.raises(CheckpointError) as e:  # read back as a checkpoint (dh-train --init, distill): the same
        load_checkpoint(copied)
    assert str(e.value) == line


def test_a_verified_hash_is_remembered_by_path_size_and_mtime(copied, monkeypatch):
    man = read_manifest(copied)
    calls = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    verify_file(copied, man, "unet.onnx")
    assert len(calls) == 1
    bundle_mod._VERIFIED.clear()  # a new process: the hash comes from the cache folder
    verify_file(copied, man, "unet.onnx")
    assert len(calls) == 1
    st = (copied / "unet.onnx").stat()
    os.utime(copied / "unet.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    verify_file(copied, man, "unet.onnx")
    assert len(calls) == 2
    assert verify_file(copied, man, "not_recorded.bin") == copied / "not_recorded.bin"  # unrecorded: not checked
    (copied / "unet.onnx").write_bytes(b"x" * st.st_size)  # same size, new content and mtime
    with pytest.raises(BundleError, match="same size"):
        verify_file(copied, man, "unet.onnx")
