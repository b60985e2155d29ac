"""Eager UNet -> ONNX with torch 2.x's ``torch.export``-based exporter, then a structural check.

Why this exporter: the legacy TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9 and,
on a TorchScript module, emits one Loop per GroupNorm plus Sequence ops; on our eager module it gives a
graph three times larger (Shape/Gather/Constant chains). The ``torch.export`` exporter gives a flat,
constant-folded graph (Conv, InstanceNormalization for GroupNorm, Gemm, MatMul, Softmax, Resize, ...).

One gap we fill: torch 2.13's ONNX translation of ``scaled_dot_product_attention`` only accepts 4-D
q/k/v, and our attention uses the authors' 3-D ``[B*heads, T, d]`` layout. :func:`attention_onnx` is
our translation: q and k each scaled by ``d**-1/4`` (the legacy QKV scaling, and the form TensorRT's
attention fusion wants), ``softmax`` computed in fp32 whatever the graph's dtype.

The fp16 variant (``unet_fp16.onnx``, what a strongly typed TensorRT network is built from) exports the
same module cast to fp16, behind a wrapper that keeps fp32 I/O: ``GroupNorm32`` already computes in
fp32 and the timestep embedding in fp32, so the graph carries those casts itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dheads.engine.backends.base import (UNET_INPUTS, UNET_OUTPUTS, BatchProfile, example_inputs,
                                         precision_dtype, unet_io_spec)
from dheads.engine.config import ModelConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.names import check_precision

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan", "SequenceConstruct", "SequenceAt", "SequenceInsert",
                           "SequenceErase", "SequenceLength", "SequenceEmpty", "SequenceMap", "SplitToSequence",
                           "ConcatFromSequence"})
# Past this many bytes of weights, initializers go to a side file (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportGraphError(ValueError):
    """The exported graph is not what the runtime expects (one-line message)."""


class UNetForExport(nn.Module):
    """The UNet with the exported signature: positional ``(x_t, timesteps, identity, motion_frames,
    audio_emb)`` in fp32 -> ``model_out`` fp32, computing in ``dtype`` inside."""

    def __init__(self, unet: DiffusedHeadsUNet, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.unet = unet
        self.dtype = dtype

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        d = self.dtype
        out = self.unet(x_t.to(d), timesteps, identity.to(d), motion_frames=motion_frames.to(d),
                        audio_emb=audio_emb.to(d))
        return out.float()


def attention_onnx(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """ONNX for ``scaled_dot_product_attention`` on 3-D or 4-D q/k/v, no mask: softmax(q k^T / sqrt(d)) v.

    3-D ``[N, T, d]`` is viewed as ``[1, N, T, d]`` (TensorRT fuses 4-D attention). The softmax runs in
    fp32 (Cast around it; a no-op in an fp32 graph, folded away).
    """
    from onnx import TensorProto
    from onnxscript import opset18 as op

    if attn_mask is not None or is_causal or dropout_p:
        raise NotImplementedError("attention_onnx handles unmasked, non-causal attention without dropout")
    rank, d = len(query.shape), query.shape[-1]
    if rank == 3:
        axis0 = op.Constant(value_ints=[0])
        query, key, value = (op.Unsqueeze(t, axis0) for t in (query, key, value))
    s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    factor = op.CastLike(op.Constant(value_float=s), query)
    logits = op.MatMul(op.Mul(query, factor), op.Mul(op.Transpose(key, perm=[0, 1, 3, 2]), factor))
    weights = op.CastLike(op.Softmax(op.Cast(logits, to=TensorProto.FLOAT), axis=-1), value)
    out = op.MatMul(weights, value)
    return op.Squeeze(out, op.Constant(value_ints=[0])) if rank == 3 else out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision not installed, deprecations) around one export."""
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        noisy.setLevel(level)


def export_unet_onnx(model: DiffusedHeadsUNet, path: str | os.PathLike, *, precision: str = "fp32",
                     opset: int = DEFAULT_OPSET, profile: BatchProfile = BatchProfile()) -> Path:
    """Write the UNet as ONNX to ``path`` and check it (:func:`check_unet_graph`). Returns ``path``.

    ``precision``: ``"fp32"`` or ``"fp16"`` (fp32 I/O either way). Static image size; axis 0 of every input
    and output is the dynamic dimension ``batch`` (traced at batch 2, valid for the whole profile).
    """
    path = Path(path)
    check_precision(precision, ("fp32", "fp16"))  # int8 is quantised from the fp32 graph (export/quantize.py)
    cfg = model.config
    dtype = precision_dtype(precision)
    wrapper = UNetForExport(_copy_in(model, dtype), dtype).eval()
    args = tuple(example_inputs(cfg, batch=2, generator=torch.Generator().manual_seed(0)).values())
    batch = torch.export.Dim("batch", min=1, max=max(1024, profile.max))
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, args, None, input_names=list(UNET_INPUTS), output_names=list(UNET_OUTPUTS),
            opset_version=opset, dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args), optimize=True,
            verbose=False,
            custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default: attention_onnx})
        nbytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)
    check_unet_graph(path, cfg)
    return path


def _copy_in(model: DiffusedHeadsUNet, dtype: torch.dtype) -> DiffusedHeadsUNet:
    """The model in ``dtype`` and eval mode; a copy when the dtype changes (the caller's stays fp32)."""
    if next(model.parameters()).dtype == dtype:
        return model.eval()
    with torch.device("meta"):
        clone = DiffusedHeadsUNet(model.config, model.diffusion)
    clone.load_state_dict({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, assign=True)
    clone.rebuild_constants()
    return clone.eval()


def iter_nodes(graph) -> Iterator:
    """Every node of an ONNX graph, recursing into subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def all_nodes(model) -> Iterator:
    """Nodes of the main graph, its subgraphs and every local function."""
    yield from iter_nodes(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield node


def op_histogram(path: str | os.PathLike) -> Counter:
    import onnx

    return Counter(n.op_type for n in all_nodes(onnx.load(str(path), load_external_data=False)))


def check_unet_graph(path: str | os.PathLike, cfg: ModelConfig) -> None:
    """Raise ExportGraphError unless ``path`` is a valid ONNX UNet for ``cfg`` the runtime can run.

    Checks: onnx checker passes; no Loop/If/Scan/Sequence op anywhere (TensorRT builds these poorly);
    inputs and outputs are named and shaped per ``unet_io_spec`` with float32 I/O, static sizes and one
    symbolic batch dimension.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportGraphError(f"{path.name}: ONNX checker failed ({str(e).splitlines()[0][:200]})") from None
    model = onnx.load(str(path), load_external_data=False)
    bad = sorted({n.op_type for n in all_nodes(model)} & FORBIDDEN_OPS)
    if bad:
        raise ExportGraphError(f"{path.name}: graph holds control-flow/sequence ops {bad}")
    inputs, outputs = unet_io_spec(cfg)
    _check_values(path.name, "input", list(model.graph.input), inputs)
    _check_values(path.name, "output", list(model.graph.output), outputs)


def _check_values(where: str, kind: str, got, specs) -> None:
    import onnx

    if [v.name for v in got] != [s.name for s in specs]:
        raise ExportGraphError(f"{where}: {kind}s {[v.name for v in got]}, expected {[s.name for s in specs]}")
    for v, spec in zip(got, specs):
        tt = v.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            raise ExportGraphError(f"{where}: {kind} {v.name} is not float32")
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
        want = [d for d in spec.shape]
        if len(dims) != len(want) or not isinstance(dims[0], str) or dims[1:] != want[1:]:
            raise ExportGraphError(f"{where}: {kind} {v.name} has shape {dims}, expected [batch, *{want[1:]}]")
