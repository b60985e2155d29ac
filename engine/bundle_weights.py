"""A ``dh-export`` bundle read back as a checkpoint: its fp32 ONNX weights into the UNet, checked against ONNX Runtime.

A bundle is what ships (the embedded demo is one); its ``.pt`` is often gone. Every bundle holds the fp32
graph ``unet.onnx`` (an fp16 export adds ``unet_fp16.onnx`` beside it). Every parameter the exporter
kept under its module name (``unet.<state_dict key>``) is read by name. GroupNorm's affine weights are not:
the exporter lowers ``GroupNorm`` to ``InstanceNormalization`` (unit scale) followed by ``Mul`` and ``Add``
with the per-channel weight and bias as constants, so those are taken from each such chain, in graph order,
which is the UNet's forward order and its state_dict order. The result is accepted only when the rebuilt
UNet matches ONNX Runtime on one random batch (``PARITY_ATOL``), so a graph of another shape is refused
rather than misread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .backends.base import example_inputs, unet_io_spec
from .bundle import UNET_ONNX as ONNX_FILE
from .bundle import BundleError, read_manifest, verify_file
from .checkpoint import Checkpoint, CheckpointError, _first_line
from .model import DiffusedHeadsUNet

log = logging.getLogger(__name__)

PREFIX = "unet."
# fp32 on CPU, the same graph: measured 1.3e-6 to 2.9e-6 max abs on the demo bundles; a misread weight is >> 1e-2.
PARITY_ATOL = 1e-4


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError("reading a bundle's weights needs the onnx package: "
                              "pip install 'diffused-heads[onnx]'") from None
    return onnx, numpy_helper


def _group_norm_affines(graph, numpy_helper) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(weight, bias)`` of each ``InstanceNormalization -> Reshape -> Mul -> Add`` chain, in graph order."""
    values = {i.name: i for i in graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"})
    users: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)

    def next_op(node, op: str):
        after = users.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != op:
            raise CheckpointError(f"{ONNX_FILE}: a normalisation is not followed by {op} (not a dh-export graph)")
        return after[0]

    out = []
    for node in (n for n in graph.node if n.op_type == "InstanceNormalization"):
        mul = next_op(next_op(node, "Reshape"), "Mul")
        add = next_op(mul, "Add")
        w, b = (values.get(op.input[1]) for op in (mul, add))
        if w is None or b is None:
            raise CheckpointError(f"{ONNX_FILE}: a GroupNorm's scale or shift is not a constant")
        out.append((numpy_helper.to_array(w), numpy_helper.to_array(b)))
    return out


def _state_dict(net: DiffusedHeadsUNet, graph, numpy_helper) -> dict[str, torch.Tensor]:
    """The UNet's state_dict from the graph's named initializers and its GroupNorm chains."""
    named = {i.name[len(PREFIX):]: i for i in graph.initializer if i.name.startswith(PREFIX)}
    params = net.state_dict()
    buffers = {k for k, _ in net.named_buffers()}
    sd, norms = {}, []
    for key, like in params.items():
        if key in named:
            sd[key] = torch.from_numpy(numpy_helper.to_array(named[key]).astype(np.float32).copy())
        elif key in buffers:
            sd[key] = like.clone()  # derived from the configs (e.g. the colour anchor's schedule table)
        elif key.endswith(".weight"):
            norms.append(key[: -len(".weight")])
    affines = _group_norm_affines(graph, numpy_helper)
    if len(affines) != len(norms):
        raise CheckpointError(f"{ONNX_FILE}: {len(affines)} GroupNorm chains for {len(norms)} unnamed norm layers "
                              "(not a dh-export graph of this model)")
    for key, (w, b) in zip(norms, affines):
        c = params[key + ".weight"].numel()
        if w.size != c or b.size != c:
            raise CheckpointError(f"{ONNX_FILE}: {key} has {c} channels, the graph's norm {w.size}")
        sd[key + ".weight"] = torch.from_numpy(w.astype(np.float32).reshape(c).copy())
        sd[key + ".bias"] = torch.from_numpy(b.astype(np.float32).reshape(c).copy())
    missing = sorted(set(params) - set(sd))
    if missing:
        raise CheckpointError(f"{ONNX_FILE}: no weights for {', '.join(missing[:3])} (not a dh-export graph)")
    return sd


def _parity(net: DiffusedHeadsUNet, onnx_path: Path) -> float:
    """Max abs difference between the rebuilt UNet and ONNX Runtime on one seeded random batch of 2 (the
    exporter's own ``example_inputs``)."""
    import onnxruntime as ort

    feeds = example_inputs(net.config, 2, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        out = net(feeds["x_t"], feeds["timesteps"], feeds["identity"], motion_frames=feeds["motion_frames"],
                  audio_emb=feeds["audio_emb"]).numpy()
    return float(np.abs(out - ref).max())


def _check_shapes(onnx_path: Path, graph, model) -> None:
    """CheckpointError unless the graph's inputs have the shapes the manifest's model config gives (the
    batch axis aside): a manifest that lies about the image size is named as such, not met as a failed run."""
    inputs, _ = unet_io_spec(model)
    want = {spec.name: spec.shape for spec in inputs}
    for arg in graph.input:
        if arg.name not in want:
            continue
        got = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in arg.type.tensor_type.shape.dim]
        expected = want[arg.name]
        if len(got) != len(expected) or any(isinstance(g, int) and e >= 0 and g != e for g, e in zip(got, expected)):
            raise CheckpointError(f"{onnx_path}: {arg.name} has shape {got} but the manifest's model config gives "
                                  f"{list(expected)}; the manifest does not describe this ONNX, re-export with "
                                  "dh-export")


def checkpoint_from_bundle(path: str | Path) -> Checkpoint:
    """The checkpoint a ``dh-export`` bundle was made from (its EMA weights: what was exported), from ``unet.onnx``."""
    path = Path(path)
    try:
        man = read_manifest(path)
    except BundleError as e:
        raise CheckpointError(str(e)) from None
    onnx_path = path / ONNX_FILE
    if not onnx_path.is_file():
        raise CheckpointError(f"{path}: the bundle has no {ONNX_FILE}")
    try:
        verify_file(path, man, ONNX_FILE)
    except BundleError as e:
        raise CheckpointError(str(e)) from None
    onnx, numpy_helper = _onnx()
    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as e:  # noqa: BLE001 - any failure is "unreadable" to the user
        raise CheckpointError(f"{onnx_path}: cannot be read as ONNX ({_first_line(e)})") from None
    _check_shapes(onnx_path, graph, man.model)
    net = DiffusedHeadsUNet(man.model, man.diffusion).eval()
    try:
        net.load_state_dict(_state_dict(net, graph, numpy_helper), strict=True)
    except RuntimeError as e:  # a weight of another shape
        raise CheckpointError(f"{onnx_path}: its weights do not fit the manifest's model config "
                              f"({_first_line(e)}); not a dh-export graph of this model") from None
    try:
        err = _parity(net, onnx_path)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise CheckpointError(f"{path}: ONNX Runtime cannot run {ONNX_FILE} on the manifest's inputs "
                              f"({_first_line(e)}); not a dh-export graph of this model") from None
    if not err <= PARITY_ATOL:
        raise CheckpointError(f"{path}: the weights read back differ from ONNX Runtime by {err:.3g} "
                              f"(> {PARITY_ATOL:g}); not a dh-export graph of this model")
    log.info("%s: weights read back from %s (ONNX Runtime vs PyTorch: max abs %.2g)", path, ONNX_FILE, err)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Checkpoint(model=man.model, state_dict=sd, audio=man.audio, diffusion=man.diffusion, source="bundle",
                      meta={"bundle": str(path), "bundle_source_sha256": man.source_sha256,
                            "bundle_parity_max_abs": err, "trained_on": dict(man.training)})
