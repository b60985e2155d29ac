"""ONNX -> TensorRT plan (``unet.plan``) for the GPU this runs on, with a persistent timing cache.

FP16, per TensorRT version (see docs_export.md for the references):

* TensorRT < 10.12, ``typing="weak"``: parse the fp32 ``unet.onnx``, set ``BuilderFlag.FP16`` and
  ``OBEY_PRECISION_CONSTRAINTS``, and pin to fp32 (``layer.precision`` + ``set_output_type``) every
  normalization layer (GroupNorm is InstanceNormalization in the graph; ``compute_precision`` fp32
  too), every softmax, and the sinusoidal timestep embedding (t up to 999 times frequencies: fp16 would
  lose the phase).
* TensorRT 10.12+ (weak typing deprecated) and 11.x (weak typing removed, every network strongly
  typed), ``typing="strong"``: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  (ignored but accepted on 11.x) and parse ``unet_fp16.onnx``, whose tensor types already keep
  GroupNorm, softmax and the timestep embedding in fp32. No precision flags.

``precision="fp32"`` builds from ``unet.onnx`` with TF32 disabled, so fp32 means fp32.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import torch

from dheads.engine.backends.base import BatchProfile, unet_io_spec
from dheads.engine.backends.tensorrt_ import gpu_identity, import_tensorrt
from dheads.engine.bundle import TIMING_CACHE, UNET_ONNX, UNET_ONNX_FP16, UNET_PLAN, TensorRTRecord, sha256_file
from dheads.engine.config import ModelConfig

log = logging.getLogger(__name__)

STRONG_TYPING_DEFAULT_SINCE = (10, 12)  # weak typing deprecated in 10.12, removed in 11.0
WEAK_TYPING_REMOVED_IN = (11, 0)
FP32_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax")


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse or build the network (one-line message)."""


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def choose_typing(version: tuple[int, ...], requested: str = "auto") -> str:
    """``"strong"`` or ``"weak"`` network typing for this TensorRT version (see the module docstring)."""
    if requested not in ("auto", "strong", "weak"):
        raise ValueError(f"typing must be auto, strong or weak, got {requested!r}")
    if requested == "weak" and version >= WEAK_TYPING_REMOVED_IN:
        raise TensorRTBuildError(f"TensorRT {'.'.join(map(str, version))} removed weak typing; use typing='strong'")
    if requested != "auto":
        return requested
    return "strong" if version >= STRONG_TYPING_DEFAULT_SINCE else "weak"


def onnx_for(precision: str, typing: str) -> str:
    """Which bundle ONNX a build parses: the fp16 graph only for a strongly typed fp16 build."""
    return UNET_ONNX_FP16 if precision == "fp16" and typing == "strong" else UNET_ONNX


def default_timing_cache(version: str, compute_capability: tuple[int, int]) -> Path:
    """``~/.cache/dheads/tensorrt/<version>-sm<cc>.cache``: reused by later builds on this GPU and TensorRT."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dheads" / "tensorrt"
    return root / f"{version}-sm{compute_capability[0]}{compute_capability[1]}.cache"


def fp32_tensor_names(onnx_path: str | os.PathLike) -> set[str]:
    """ONNX tensors a weakly typed fp16 build must keep in fp32: outputs of norms and softmax, and of the
    timestep embedding (every node upstream of Cos/Sin, and the Concat joining them)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    names: set[str] = set()
    for node in graph.node:
        if node.op_type in FP32_OPS:
            names.update(node.output)
    trig = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    stack = list(trig)
    while stack:
        node = stack.pop()
        if node.output[0] in names:
            continue
        names.update(node.output)
        stack.extend(producer[i] for i in node.input if i in producer)
    trig_out = {o for n in trig for o in n.output}
    names.update(o for n in graph.node if n.op_type == "Concat" and trig_out & set(n.input) for o in n.output)
    return names


def _pin_fp32(trt, network, names: set[str]) -> int:
    """Constrain layers that produce ``names`` (and all normalization/softmax layers) to fp32."""
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        wanted = layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX) or any(o.name in names for o in outs)
        if not wanted or not all(o.dtype in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # get_layer returns the ILayer base class
            layer.compute_precision = trt.float32
        pinned += 1
    return pinned


def _parse(trt, builder, logger, onnx_path: Path, typing: str):
    flags = 0
    if typing == "strong" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # INormalizationLayer, not the plugin
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path.name}: "
                                 f"{errors[0].splitlines()[0] if errors else 'unknown error'}")
    return network, parser


def _load_timing_cache(config, path: Path | None):
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def build_plan(bundle_dir: str | os.PathLike, cfg: ModelConfig, *, profile: BatchProfile, precision: str,
               typing: str = "auto", timing_cache: str | os.PathLike | None = None,
               workspace_bytes: int | None = None, optimization_level: int | None = None,
               device: torch.device | str | None = None) -> TensorRTRecord:
    """Build ``bundle_dir/unet.plan`` from the bundle's ONNX; write ``timing.cache`` beside it.

    ``timing_cache``: a cache file read before and updated after the build (default: per TensorRT
    version and GPU under ``~/.cache/dheads/tensorrt``). Returns the manifest's TensorRT record.
    """
    trt = import_tensorrt()
    bundle_dir = Path(bundle_dir)
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    gpu_name, cc = gpu_identity(device)
    typing = choose_typing(version_tuple(trt.__version__), typing)
    onnx_name = onnx_for(precision, typing)
    onnx_path = bundle_dir / onnx_name
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"{onnx_name} is missing from the bundle (export it with --precision {precision})")
    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache(trt.__version__, cc)
    logger = trt.Logger(trt.Logger.WARNING)
    t0 = time.perf_counter()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, onnx_path, typing)
        config = builder.create_builder_config()
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if precision == "fp16" and typing == "weak":
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            log.info("pinned %d layers to fp32", _pin_fp32(trt, network, fp32_tensor_names(onnx_path)))
        config.add_optimization_profile(_profile(builder, cfg, profile))
        cache = _load_timing_cache(config, cache_path)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError("TensorRT failed to build the engine (see the TensorRT log above)")
        plan = bundle_dir / UNET_PLAN
        with open(plan, "wb") as f:
            f.write(serialized)
        _save_timing_cache(config.get_timing_cache() or cache, bundle_dir / TIMING_CACHE, cache_path)
    return TensorRTRecord(version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
                          plan_sha256=sha256_file(plan), typing=typing, onnx_file=onnx_name, precision=precision,
                          workspace_bytes=workspace_bytes, builder_optimization_level=optimization_level,
                          build_seconds=round(time.perf_counter() - t0, 3))


def _profile(builder, cfg: ModelConfig, profile: BatchProfile):
    """One optimisation profile: every input's batch axis over min/opt/max, other axes static."""
    prof = builder.create_optimization_profile()
    inputs, _ = unet_io_spec(cfg)
    for spec in inputs:
        prof.set_shape(spec.name, spec.concrete(profile.min), spec.concrete(profile.opt), spec.concrete(profile.max))
    return prof


def _save_timing_cache(cache, bundle_copy: Path, user_copy: Path) -> None:
    """Write the cache into the bundle (must succeed) and to the user cache (best effort)."""
    data = bytes(cache.serialize())
    bundle_copy.write_bytes(data)
    try:
        user_copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = user_copy.with_name(user_copy.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, user_copy)
    except OSError as e:
        log.warning("cannot update the timing cache %s (%s)", user_copy, e)
