"""A CPU stand-in for the ``tensorrt`` module: NOT TensorRT, only its Python API's shape.

It exists so the TensorRT backend's bookkeeping can be tested where TensorRT cannot be installed: which
execution context each call runs on, which shapes and addresses each context was given, and what the
backend does when a call fails. Its engine reads its inputs from, and writes its output to, the raw
addresses the backend binds (CPU memory here), and computes ``analytic_unet`` on them: a stale or wrong
address shows up as wrong frames. Like TensorRT it refuses an address that is not 256-byte aligned
(``setTensorAddress``: "The pointer must have at least 256-byte alignment").
"""

from __future__ import annotations

import ctypes
import math
from types import SimpleNamespace

import torch

from dheads.engine.backends.base import UNET_INPUTS, UNET_OUTPUTS, BatchProfile


def analytic_unet(x_t, timesteps, identity, motion_frames, audio_emb, out_channels: int) -> torch.Tensor:
    """A cheap function of every UNet input, ``[B, out_channels, H, W]``: what the stand-in engine computes."""
    b = x_t.shape[0]
    base = (0.5 * x_t + 0.1 * identity + 0.05 * motion_frames.reshape(b, -1, *x_t.shape[2:]).mean(1, keepdim=True)
            + 0.01 * audio_emb.reshape(b, -1).mean(1).view(b, 1, 1, 1) + (timesteps / 1000).view(b, 1, 1, 1))
    return base.repeat(1, out_channels // 3, 1, 1)


class AnalyticDenoiser:
    """``analytic_unet`` as a plain torch Denoiser: the frames the stand-in engine must reproduce."""

    name, graph_safe = "analytic", False

    def __init__(self, config, device="cpu"):
        self.config, self.device = config, torch.device(device)

    def __call__(self, *args):
        return analytic_unet(*args, out_channels=self.config.out_channels)


def _view(ptr: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 CPU memory at ``ptr`` as a tensor of ``shape`` (no copy)."""
    n = math.prod(shape)
    return torch.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=torch.float32, count=n).view(shape)


class StandInContext:
    """Records every call; ``fail`` names a method that returns False, as TensorRT's would on an error."""

    def __init__(self, engine: StandInEngine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []
        self.address_calls: list[tuple[str, int]] = []
        self.executions: list[int] = []  # the stream handle of each execute_async_v3

    def set_input_shape(self, name: str, shape) -> bool:
        self.shape_calls.append((name, tuple(shape)))
        if self.engine.fail == "set_input_shape":
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.address_calls.append((name, ptr))
        if self.engine.fail == "set_tensor_address" or ptr % 256:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.executions.append(stream_handle)
        if self.engine.fail == "execute_async_v3":
            return False
        args = [_view(self.addresses[n], self.shapes[n]) for n in UNET_INPUTS]
        out_shape = (args[0].shape[0], self.engine.out_channels, *args[0].shape[2:])
        _view(self.addresses[UNET_OUTPUTS[0]], out_shape).copy_(analytic_unet(*args, self.engine.out_channels))
        return True


class StandInEngine:
    """An ``ICudaEngine`` look-alike over the UNet's I/O names (all float32)."""

    num_io_tensors = len(UNET_INPUTS) + len(UNET_OUTPUTS)
    device_memory_size_v2 = 3 * 2**20

    def __init__(self, out_channels: int):
        self.out_channels = out_channels
        self.contexts: list[StandInContext] = []
        # which call fails: create_execution_context | set_input_shape | set_tensor_address | execute_async_v3
        self.fail: str | None = None

    def get_tensor_name(self, i: int) -> str:
        return (*UNET_INPUTS, *UNET_OUTPUTS)[i]

    def get_tensor_mode(self, name: str) -> str:
        return StandInTensorRT.TensorIOMode.INPUT if name in UNET_INPUTS else StandInTensorRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return StandInTensorRT.float32

    def create_execution_context(self):
        if self.fail == "create_execution_context":
            return None  # what TensorRT returns when it cannot allocate the context's memory
        ctx = StandInContext(self)
        self.contexts.append(ctx)
        return ctx


class StandInTensorRT:
    """The module: the names the backend reads."""

    __version__ = "0.0.0-standin"
    float32, float16, int32 = "float32", "float16", "int32"
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")


def standin_denoiser(config, profile: BatchProfile = BatchProfile(1, 1, 2)):
    """A TrtDenoiser on the CPU over a fresh stand-in engine, and that engine."""
    from dheads.engine.backends.tensorrt_ import TrtDenoiser

    engine = StandInEngine(config.out_channels)
    manifest = SimpleNamespace(model=config, profile=profile)
    return TrtDenoiser.from_engine(StandInTensorRT, engine, manifest, device="cpu", path="standin.plan"), engine
