"""A dh-export bundle opens as a checkpoint: the exported weights back, bit for bit, or one clear line.

The small model has every parameter random (GroupNorm affines included), so a GroupNorm read from the
wrong chain, or a weight from the wrong initializer, changes the state_dict and the parity check.
"""

from __future__ import annotations

import dataclasses
import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper

from dheads.engine.bundle import BundleFile, read_manifest, write_manifest
from dheads.engine.checkpoint import CheckpointError, load_checkpoint
from dheads.engine.plan import default_sampler

from _small_bundle import small_export


def _rerecord(bundle, name="unet.onnx"):
    """Record an edited file's new size and sha256 in the manifest (as a deliberate re-export would)."""
    man = read_manifest(bundle)
    files = tuple(BundleFile.of(bundle, f.name) if f.name == name else f for f in man.files)
    write_manifest(bundle, dataclasses.replace(man, files=files))


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    ckpt, result = small_export(request.config, tmp_path_factory)
    return ckpt, result.out_dir


def test_a_bundle_opens_as_the_checkpoint_it_was_exported_from(exported):
    ckpt_path, bundle = exported
    original, back = load_checkpoint(ckpt_path), load_checkpoint(bundle)
    assert back.source == "bundle" and back.model == original.model and back.audio == original.audio
    assert back.diffusion == original.diffusion and default_sampler(back.diffusion) == default_sampler(original.diffusion)
    want = original.weights(ema=True)
    assert sorted(back.state_dict) == sorted(want)
    assert all(torch.equal(back.state_dict[k], want[k]) for k in want), "a weight was not read back exactly"
    assert back.meta["bundle_parity_max_abs"] < 1e-5
    net = back.build()  # strict load: every tensor is there with its shape
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in original.build().parameters())


def test_a_bundle_with_a_changed_norm_constant_reads_back_the_change(exported, tmp_path):
    """The GroupNorm affines come from the graph's Mul/Add chains, in order: scaling the third norm's scale
    constant in the graph shows up in exactly that layer of the state_dict."""
    ckpt_path, bundle = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    model = onnx.load(str(copy / "unet.onnx"))
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    users = {i: n for n in model.graph.node for i in n.input}
    mul = users[users[norms[2].output[0]].output[0]]
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    t = consts[mul.input[1]]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    onnx.save(model, str(copy / "unet.onnx"))
    _rerecord(copy)
    back, original = load_checkpoint(copy), load_checkpoint(ckpt_path).weights(ema=True)
    norm_keys = [k for k in original if k.endswith(".weight") and original[k].dim() == 1
                 and not k.startswith(("time_embed", "audio_embed"))]
    changed = [k for k in original if not torch.equal(back.state_dict[k], original[k])]
    assert changed == [norm_keys[2]]
    torch.testing.assert_close(back.state_dict[norm_keys[2]], original[norm_keys[2]] * 2)


def test_bad_bundles_are_one_line(exported, tmp_path):
    _, bundle = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"^.*empty/manifest.json: no manifest \(not an export bundle made by "
                                              r"dh-export\)$"):
        load_checkpoint(empty)
    no_graph = tmp_path / "nograph"
    shutil.copytree(bundle, no_graph)
    (no_graph / "unet.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"^.*nograph: the bundle has no unet.onnx$"):
        load_checkpoint(no_graph)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "unet.onnx").write_bytes(b"not onnx")
    size = (bundle / "unet.onnx").stat().st_size
    with pytest.raises(CheckpointError, match=rf"^.*broken/unet.onnx: 8 bytes, but the manifest records {size} bytes "
                                              r"\(sha256 [0-9a-f]{12}\); the file was replaced or damaged, re-export "
                                              r"with dh-export$"):
        load_checkpoint(broken)
    _rerecord(broken)  # the manifest agrees: the file itself is read, and is not ONNX
    with pytest.raises(CheckpointError, match=r"^.*broken/unet.onnx: cannot be read as ONNX \("):
        load_checkpoint(broken)
