"""TensorRT backend: runs a ``unet.plan`` built by ``dh-export`` on torch CUDA buffers.

A plan is only valid for the TensorRT version and the GPU it was built on, so the manifest's record is
checked against this machine before deserialising, and a mismatch is refused with the command that
fixes it. Inputs are bound by ``data_ptr`` (``set_tensor_address``), the output buffer is preallocated
per batch size and reused, and the engine is enqueued on torch's current stream with
``execute_async_v3``: no host synchronisation, so a CUDA graph may capture the call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..bundle import Manifest, TensorRTRecord
from .base import UNET_INPUTS, UNET_OUTPUTS, BackendError, unet_io_spec

log = logging.getLogger(__name__)

REBUILD = "rebuild the plan on this machine with `dh-export CHECKPOINT`"


def import_tensorrt(instead: str = "run this bundle with backend='onnxruntime' instead"):
    """The ``tensorrt`` module, or BackendError saying how to get it (and ``instead``, what to do meanwhile)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(f"TensorRT is not installed (pip install tensorrt); {instead}") from None
    return trt


def gpu_identity(device: torch.device | str | None = None) -> tuple[str, tuple[int, int]]:
    """``(name, (major, minor))`` of a CUDA device, as recorded in a plan's manifest."""
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs a CUDA GPU; torch sees none")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.cuda.get_device_name(dev), tuple(torch.cuda.get_device_capability(dev))


def check_plan_compat(record: TensorRTRecord | None, *, trt_version: str, gpu_name: str,
                      compute_capability: tuple[int, int], where: str = "plan",
                      allow_other_gpu_name: bool = False) -> None:
    """Refuse a plan built for another TensorRT or GPU (BackendError, one line saying what to do).

    The TensorRT version must match exactly and so must the compute capability (kernels are compiled
    per SM). A different GPU name with the same capability (e.g. another H100 board) still runs but its
    tactics were timed elsewhere: refused unless ``allow_other_gpu_name``.
    """
    if record is None:
        raise BackendError(f"{where}: the manifest records no TensorRT build; {REBUILD}")
    if record.version != trt_version:
        raise BackendError(f"{where}: built with TensorRT {record.version} but {trt_version} is installed; "
                           f"{REBUILD}")
    cc = tuple(compute_capability)
    if tuple(record.compute_capability) != cc:
        raise BackendError(f"{where}: built for {record.gpu_name} (sm_{_sm(record.compute_capability)}) but this "
                           f"GPU is {gpu_name} (sm_{_sm(cc)}); {REBUILD}")
    if record.gpu_name != gpu_name:
        if not allow_other_gpu_name:
            raise BackendError(f"{where}: built on {record.gpu_name} but this GPU is {gpu_name}; {REBUILD} "
                               f"(or pass allow_other_gpu_name=True: same sm_{_sm(cc)}, untuned tactics)")
        log.warning("%s: built on %s, running on %s (same sm_%s)", where, record.gpu_name, gpu_name, _sm(cc))


def _sm(cc) -> str:
    return f"{cc[0]}{cc[1]}"


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dtype not in table:
        raise BackendError(f"plan I/O tensor of type {dtype} is not supported; {REBUILD}")
    return table[dtype]


class TrtDenoiser:
    """``denoiser(x_t, timesteps, identity, motion_frames, audio_emb) -> model_out`` on a TensorRT plan.

    ``manifest`` is the bundle's (its ``tensorrt`` record is checked against this GPU and TensorRT).
    The returned tensor is a buffer reused by the next call with the same batch size.
    """

    name = "tensorrt"
    graph_safe = True

    def __init__(self, plan_path: str | os.PathLike, manifest: Manifest, *, device: torch.device | str = "cuda",
                 allow_other_gpu_name: bool = False):
        trt = import_tensorrt()
        self.path = Path(plan_path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendError(f"TensorRT plans run on CUDA, not {self.device}; pass device='cuda'")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        name, cc = gpu_identity(self.device)
        check_plan_compat(manifest.tensorrt, trt_version=trt.__version__, gpu_name=name, compute_capability=cc,
                          where=str(self.path), allow_other_gpu_name=allow_other_gpu_name)
        self.config = manifest.model
        self.profile = manifest.profile
        self.inputs, self.outputs = unet_io_spec(self.config)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self._read_plan())
            if self.engine is None:
                raise BackendError(f"{self.path}: TensorRT cannot deserialise this plan; {REBUILD}")
            self.context = self.engine.create_execution_context()
        self._dtypes = self._check_io(trt)
        self._batch: int | None = None
        self._bound: dict[str, torch.Tensor] = {}
        self._out: dict[int, torch.Tensor] = {}
        self._warm_up()
        log.info("tensorrt %s plan %s on %s (%s)", trt.__version__, self.path.name, self.device, name)

    def _read_plan(self) -> bytes:
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such plan file")
        return self.path.read_bytes()

    def _check_io(self, trt) -> dict[str, torch.dtype]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(UNET_INPUTS) or outputs != list(UNET_OUTPUTS):
            raise BackendError(f"{self.path}: plan I/O {inputs} -> {outputs} is not the UNet's; {REBUILD}")
        return {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def _warm_up(self) -> None:
        """One call at the profile's opt batch: TensorRT does its lazy setup here, not under graph capture."""
        b = self.profile.opt
        zeros = [torch.zeros(s.concrete(b), device=self.device) for s in self.inputs]
        self(*zeros)
        torch.cuda.current_stream(self.device).synchronize()

    def _set_batch(self, b: int) -> None:
        if not self.profile.min <= b <= self.profile.max:
            raise BackendError(f"{self.path}: batch {b} is outside the plan's profile "
                               f"{self.profile.min}..{self.profile.max}; re-export with --batch")
        for spec in self.inputs:
            if not self.context.set_input_shape(spec.name, spec.concrete(b)):
                raise BackendError(f"{self.path}: TensorRT refused shape {spec.concrete(b)} for {spec.name}")
        self._batch = b

    def _output(self, b: int) -> torch.Tensor:
        out = self._out.get(b)
        if out is None:
            spec = self.outputs[0]
            out = self._out[b] = torch.empty(spec.concrete(b), device=self.device, dtype=self._dtypes[spec.name])
        return out

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """Shapes as ``unet_io_spec``; motion frames may also be ``[B, M, c, H, W]``. Returns ``[B, C_out, H, W]``."""
        b = x_t.shape[0]
        if b != self._batch:
            self._set_batch(b)
        for spec, t in zip(self.inputs, (x_t, timesteps, identity, motion_frames, audio_emb)):
            t = t.to(device=self.device, dtype=self._dtypes[spec.name]).reshape(spec.concrete(b)).contiguous()
            self._bound[spec.name] = t  # keep alive until the next call
            self.context.set_tensor_address(spec.name, t.data_ptr())
        out = self._output(b)
        self.context.set_tensor_address(self.outputs[0].name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendError(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
        return out if out.dtype == torch.float32 else out.float()
