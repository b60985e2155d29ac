"""TensorRT backend: runs a ``unet.plan`` built by ``dh-export`` on torch CUDA buffers.

A plan is only valid for the TensorRT version and the GPU it was built on, so the manifest's record is
checked against this machine before deserialising, and a mismatch is refused with the command that
fixes it. Every input and the output live in buffers of the backend's own, 256-byte aligned as
``set_tensor_address`` requires, preallocated per batch and bound once; a call copies its tensors in and
enqueues with ``execute_async_v3``: no host synchronisation, so a CUDA graph may capture the call. Each
captured graph gets an execution context of its own (``for_graph``); eager calls share one on a stream
of the denoiser's own. Every TensorRT return value is checked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .artifact import Artifact, Runtime
from .base import BackendError, resolve_device
from ..specs import UNET_INPUTS, UNET_OUTPUTS, unet_io_spec

if TYPE_CHECKING:  # the bundle's records are read, never built, here: no import of bundle.py at run time
    from ..bundle import Manifest, TensorRTRecord

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes: TensorRT's setTensorAddress requires it of every I/O address
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


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose ``data_ptr()`` is a multiple of ``ALIGNMENT``, whatever the allocator.

    torch's CUDA allocator already rounds blocks to 512 bytes, but a view into a buffer (a row of a table)
    is not aligned, and the CPU allocator promises only 64 bytes: over-allocate and start at an aligned element.
    """
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n + ALIGNMENT // itemsize, dtype=dtype, device=device)
    skip = (-raw.data_ptr() % ALIGNMENT) // itemsize
    return raw[skip:skip + n].view(shape)


def engine_memory_bytes(engine) -> int:
    """Scratch (activation) memory one execution context of ``engine`` allocates: ``device_memory_size_v2``
    (TensorRT 10.1+; ``device_memory_size`` is gone in 11)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def accepts(artifact: Artifact) -> bool:
    """TensorRT runs a plan: a ``.plan`` beside its manifest, or a bundle folder (the plan it records)."""
    return artifact.kind in ("bundle", "plan")


def refusal(artifact: Artifact) -> str:
    """Why not, where :func:`accepts` says no to an exported artifact (an ``.onnx``)."""
    return (f"{artifact.path}: the tensorrt backend runs a plan; build one with `dh-export` on a GPU machine with "
            "TensorRT, or use backend='onnxruntime'")


def open(artifact: Artifact, runtime: Runtime) -> tuple[TrtDenoiser, str]:  # noqa: A001 - the backend protocol's name
    """The artifact's plan in a ``TrtDenoiser`` on ``runtime.device`` (CUDA), and the precision it was built for
    (a plan computes in that, whatever was asked; logged when they differ)."""
    plan = artifact.plan()
    if not plan.is_file():
        raise BackendError(f"{plan.parent}: the bundle has no TensorRT plan; build one with `dh-export` on a GPU "
                           "machine with TensorRT, or use backend='onnxruntime'")
    import_tensorrt()  # a clear error before anything else when TensorRT is missing
    if runtime.device.type != "cuda":
        raise BackendError(f"{plan}: TensorRT plans run on CUDA, not {runtime.device}; pass device='cuda'")
    artifact.verified(plan)
    manifest = artifact.manifest
    built = manifest.tensorrt.precision if manifest.tensorrt else manifest.precision
    if runtime.precision != built:
        log.info("%s was built for %s; running it in %s (asked for %s)", plan.name, built, built, runtime.precision)
    return TrtDenoiser(plan, manifest, device=runtime.device), built


class _Context:
    """One TensorRT execution context with input and output buffers of its own, 256-byte aligned.

    Each batch size gets its buffers once; ``shape(b)`` sets the context's input shapes and binds the
    batch's buffers (every TensorRT return value checked), ``run`` copies the caller's tensors into the
    bound inputs and enqueues. The addresses a context holds never point into a caller's tensor, so a
    CUDA graph captured on it replays on exactly the memory it was captured with.
    """

    def __init__(self, engine, inputs, outputs, dtypes: dict[str, torch.dtype], device: torch.device, where: str):
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{where}: TensorRT cannot create an execution context "
                               f"({engine_memory_bytes(engine) / 2**20:.0f} MiB of GPU memory; is the GPU full?)")
        self.inputs, self.outputs, self.dtypes, self.device, self.where = inputs, outputs, dtypes, device, where
        self.batch: int | None = None
        self._buffers: dict[int, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}

    def buffers(self, b: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(inputs, out, out_fp32)`` of batch ``b``; ``out_fp32`` is ``out`` when the plan outputs fp32."""
        if b not in self._buffers:
            ins = [aligned_empty(s.concrete(b), self.dtypes[s.name], self.device) for s in self.inputs]
            spec = self.outputs[0]
            out = aligned_empty(spec.concrete(b), self.dtypes[spec.name], self.device)
            out32 = out if out.dtype == torch.float32 else torch.empty(out.shape, device=self.device)
            self._buffers[b] = (ins, out, out32)
        return self._buffers[b]

    def shape(self, b: int) -> None:
        """Shape the context for batch ``b`` and bind that batch's buffers (nothing to do when it already is)."""
        if b == self.batch:
            return
        ins, out, _ = self.buffers(b)
        for spec in self.inputs:
            if not self.context.set_input_shape(spec.name, spec.concrete(b)):
                raise BackendError(f"{self.where}: TensorRT refused shape {spec.concrete(b)} for {spec.name}")
        for spec, buf in zip((*self.inputs, *self.outputs), (*ins, out)):
            self._bind(spec.name, buf)
        self.batch = b

    def _bind(self, name: str, buf: torch.Tensor) -> None:
        ptr = buf.data_ptr()
        if ptr % ALIGNMENT:
            raise BackendError(f"{self.where}: {name} at {ptr:#x} is not {ALIGNMENT}-byte aligned")
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"{self.where}: TensorRT refused the address of {name}")

    def run(self, args: tuple[torch.Tensor, ...], stream: int) -> torch.Tensor:
        """Copy ``args`` into the bound inputs and enqueue on ``stream`` (a ``cudaStream_t`` as int)."""
        ins, out, out32 = self.buffers(self.batch)
        for buf, t in zip(ins, args):
            buf.copy_(t.reshape(buf.shape))
        if not self.context.execute_async_v3(stream):
            raise BackendError(f"{self.where}: TensorRT execution failed (see the TensorRT log above)")
        if out32 is not out:
            out32.copy_(out)
        return out32


@contextlib.contextmanager
def _own_stream(stream: torch.cuda.Stream | None, device: torch.device) -> Iterator[int]:
    """Run the block on ``stream`` after the caller's stream, and make the caller's stream wait for it:
    event hand-off, no host synchronisation. Yields the stream handle (0 with no stream: a CPU stand-in)."""
    if stream is None:
        yield 0
        return
    with torch.cuda.device(device):
        caller = torch.cuda.current_stream(device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            yield stream.cuda_stream
        caller.wait_stream(stream)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TrtDenoiser:
    """``denoiser(x_t, timesteps, identity, motion_frames, audio_emb) -> model_out`` on a TensorRT plan.

    ``manifest`` is the bundle's (its ``tensorrt`` record is checked against this GPU and TensorRT).
    Eager calls use one execution context, reshaped when the batch changes, and run on a CUDA stream of
    the denoiser's own (never the legacy default stream, which costs TensorRT a device sync per call),
    handed off to and from the caller's stream by events. A CUDA graph captures ``for_graph()``, which has
    an execution context of its own: a context reshaped after capture would replay undefined. The
    returned tensor is a buffer reused by the next call with the same batch size.
    """

    name = "tensorrt"
    graph_safe = True

    def __init__(self, plan_path: str | os.PathLike, manifest: Manifest, *, device: torch.device | str = "cuda",
                 allow_other_gpu_name: bool = False):
        trt = import_tensorrt()
        path, device = Path(plan_path), resolve_device(device)
        if device.type != "cuda":
            raise BackendError(f"TensorRT plans run on CUDA, not {device}; pass device='cuda'")
        name, cc = gpu_identity(device)
        check_plan_compat(manifest.tensorrt, trt_version=trt.__version__, gpu_name=name, compute_capability=cc,
                          where=str(path), allow_other_gpu_name=allow_other_gpu_name)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        with torch.cuda.device(device):
            engine = self._runtime.deserialize_cuda_engine(_read_plan(path))
            if engine is None:
                raise BackendError(f"{path}: TensorRT cannot deserialise this plan; {REBUILD}")
            self._setup(trt, engine, manifest, device, path)
            self._warm_up()
        log.info("tensorrt %s plan %s on %s (%s)", trt.__version__, path.name, device, name)

    @classmethod
    def from_engine(cls, trt, engine, manifest: Manifest, *, device: torch.device | str,
                    path: str | os.PathLike = "unet.plan") -> TrtDenoiser:
        """Wrap an engine already deserialised, without the plan and GPU checks or the warm-up call; on a
        CPU ``device`` nothing runs on a stream (only the tests' engine stand-in runs there)."""
        self = cls.__new__(cls)
        self._setup(trt, engine, manifest, torch.device(device), Path(path))
        return self

    def _setup(self, trt, engine, manifest: Manifest, device: torch.device, path: Path) -> None:
        self.engine, self.device, self.path = engine, device, path
        self.config, self.profile = manifest.model, manifest.profile
        self.inputs, self.outputs = unet_io_spec(self.config)
        self._dtypes = self._check_io(trt)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._eager = self._new_context()
        self._graph_runners: weakref.WeakSet[TrtGraphDenoiser] = weakref.WeakSet()

    def _new_context(self) -> _Context:
        return _Context(self.engine, self.inputs, self.outputs, self._dtypes, self.device, str(self.path))

    def _check_io(self, trt) -> dict[str, torch.dtype]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(UNET_INPUTS) or outputs != list(UNET_OUTPUTS):
            raise BackendError(f"{self.path}: plan I/O {inputs} -> {outputs} is not the UNet's; {REBUILD}")
        return {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def _warm_up(self) -> None:
        """One call at the profile's opt batch: TensorRT does its lazy setup here, not in a timed call."""
        b = self.profile.opt
        self(*[torch.zeros(s.concrete(b), device=self.device) for s in self.inputs])
        self._stream.synchronize()

    def check_batch(self, b: int) -> int:
        """``b`` if the plan's profile accepts it, else BackendError (one line)."""
        if not self.profile.min <= b <= self.profile.max:
            raise BackendError(f"{self.path}: batch {b} is outside the plan's profile "
                               f"{self.profile.min}..{self.profile.max}; re-export with --batch")
        return b

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """Shapes as ``unet_io_spec``; motion frames may also be ``[B, M, c, H, W]``. Returns ``[B, C_out, H, W]``."""
        b = self.check_batch(x_t.shape[0])
        if _capturing(self.device):
            raise BackendError(f"{self.path}: capture a CUDA graph of denoiser.for_graph(), not of the eager "
                               "denoiser (its TensorRT context is reshaped by later calls)")
        with _own_stream(self._stream, self.device) as stream:
            self._eager.shape(b)
            return self._eager.run((x_t, timesteps, identity, motion_frames, audio_emb), stream)

    def for_graph(self) -> TrtGraphDenoiser:
        """A denoiser for exactly one captured CUDA graph, with a TensorRT execution context of its own."""
        runner = TrtGraphDenoiser(self, self._new_context())
        self._graph_runners.add(runner)
        return runner

    @property
    def contexts(self) -> int:
        """Execution contexts alive: the eager one and one per live ``for_graph`` denoiser."""
        return 1 + len(self._graph_runners)

    @property
    def device_memory_bytes(self) -> int:
        """TensorRT's own GPU memory outside torch's allocator: every live context's scratch memory plus the
        plan (about the size of its weights, which the engine holds on the GPU)."""
        plan = self.path.stat().st_size if self.path.is_file() else 0
        return self.contexts * engine_memory_bytes(self.engine) + plan


class TrtGraphDenoiser:
    """The TensorRT plan for one CUDA graph: its own execution context, shaped once for one batch.

    Runs on the caller's current stream (the graph's capture stream; the frame loop's warm-up runs it on
    that same stream first, which is the enqueue TensorRT wants before a capture).
    """

    name = "tensorrt"
    graph_safe = True

    def __init__(self, parent: TrtDenoiser, context: _Context):
        self.parent, self.ctx = parent, context
        self.device, self.config = parent.device, parent.config

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        b = self.parent.check_batch(x_t.shape[0])
        if self.ctx.batch not in (None, b):
            raise BackendError(f"{self.parent.path}: this graph's TensorRT context runs batch {self.ctx.batch}, "
                               f"not {b}; take another for_graph()")
        self.ctx.shape(b)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        return self.ctx.run((x_t, timesteps, identity, motion_frames, audio_emb), stream)


def _read_plan(path: Path) -> bytes:
    if not path.is_file():
        raise BackendError(f"{path}: no such plan file")
    return path.read_bytes()
