"""ONNX Runtime backend: runs an exported ``unet.onnx`` (CPU EP, or CUDA EP with I/O binding).

On CUDA the inputs are bound by pointer straight from torch tensors and the output is written into a
torch buffer this backend owns, so no copy goes through the host. ONNX Runtime synchronises its
stream at the end of every run, so this backend is not graph-safe.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..bundle import UNET_ONNX_FP16, UNET_ONNX_INT8
from ..config import ModelConfig
from .artifact import ONNX_KINDS, Artifact, Runtime, plan_refusal
from .base import BackendError, resolve_device
from ..specs import UNET_INPUTS, UNET_OUTPUTS, unet_io_spec

log = logging.getLogger(__name__)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime "
                           "(or onnxruntime-gpu for CUDA)") from None
    return ort


def own_stream(device: torch.device) -> tuple[torch.cuda.Stream, int]:
    """A new CUDA stream on ``device`` for a session's ``user_compute_stream``, and its handle."""
    stream = torch.cuda.Stream(device)
    return stream, stream.cuda_stream


def has_cuda_provider() -> bool:
    """Whether the installed ONNX Runtime can run on CUDA (``onnxruntime-gpu``); BackendError if none is installed."""
    return "CUDAExecutionProvider" in _import_ort().get_available_providers()


def accepts(artifact: Artifact) -> bool:
    """ONNX Runtime runs an exported ONNX: a bundle folder or an ``.onnx`` beside its manifest."""
    return artifact.kind in ONNX_KINDS


def refusal(artifact: Artifact) -> str:
    """Why not, where :func:`accepts` says no to an exported artifact (a plan)."""
    return plan_refusal(artifact, "onnxruntime")


def open(artifact: Artifact, runtime: Runtime) -> tuple[OrtDenoiser, str]:  # noqa: A001 - the backend protocol's name
    """The artifact's ONNX for ``runtime.precision`` (``unet.onnx``, ``unet_fp16.onnx``, ``unet_int8.onnx``) in an
    ``OrtDenoiser``, and the precision it computes in. With ``device='auto'`` and no CUDA execution provider
    (plain ``onnxruntime``), it runs on the CPU."""
    device = runtime.device
    if runtime.auto_device and device.type == "cuda" and not has_cuda_provider():
        log.info("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu); running on the CPU")
        device = torch.device("cpu")
    onnx = artifact.onnx(runtime.precision)
    used = {UNET_ONNX_FP16: "fp16", UNET_ONNX_INT8: "int8"}.get(onnx.name, "fp32")
    return OrtDenoiser(onnx, artifact.manifest.model, device=device, intra_op_threads=runtime.threads), used


class OrtDenoiser:
    """``denoiser(x_t, timesteps, identity, motion_frames, audio_emb) -> model_out`` via ONNX Runtime.

    ``intra_op_threads``: CPU threads per operator (default: ONNX Runtime's choice, all cores).
    On CUDA, ``onnxruntime-gpu`` must be installed (a session whose CUDA provider fails to load is refused,
    not run on the CPU); the session runs on a CUDA stream of its own, which waits for torch's by event.
    """

    name = "onnxruntime"
    graph_safe = False

    def __init__(self, onnx_path: str | os.PathLike, config: ModelConfig, *, device: torch.device | str = "cpu",
                 intra_op_threads: int | None = None):
        ort = _import_ort()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file")
        self.device = resolve_device(device)  # cuda -> cuda:N here, once; nothing below changes it
        self.config = config
        self.inputs, self.outputs = unet_io_spec(config)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The frame loop runs torch ops (the sampler update) between calls; spinning ORT workers
        # would hold the cores those ops need (measured: a 2.2 ms call became a 6.6 ms step on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        providers = self._providers(ort)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({_first_line(e)})") from None
        self._check_provider()
        self._check_io()
        self._out: dict[int, torch.Tensor] = {}
        log.info("onnxruntime %s on %s (%s)", ort.__version__, self.device, self.session.get_providers()[0])

    def _providers(self, ort) -> list:
        if self.device.type == "cpu":
            return ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            raise BackendError(f"onnxruntime backend runs on cpu or cuda, not {self.device}")
        if not has_cuda_provider():
            raise BackendError("onnxruntime has no CUDA execution provider here; pip install onnxruntime-gpu, "
                               "or use device='cpu' or the tensorrt backend")
        self._stream, handle = own_stream(self.device)
        return [("CUDAExecutionProvider", {"device_id": str(self.device.index), "user_compute_stream": str(handle)}),
                "CPUExecutionProvider"]

    def _check_provider(self) -> None:
        """On CUDA the session's first provider must be CUDA's: ONNX Runtime falls back to the CPU with only a
        warning when its CUDA provider cannot load (e.g. built for another CUDA than torch's)."""
        first = self.session.get_providers()[0]
        if self.device.type == "cuda" and first != "CUDAExecutionProvider":
            raise BackendError(f"{self.path}: CUDA asked for but ONNX Runtime's CUDA execution provider did not "
                               f"load (the session runs on {first}); install an onnxruntime-gpu built for torch's "
                               f"CUDA ({torch.version.cuda or 'none'}), or use device='cpu'")

    def _check_io(self) -> None:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(got_in) != sorted(UNET_INPUTS) or got_out != list(UNET_OUTPUTS):
            raise BackendError(f"{self.path}: inputs {got_in} / outputs {got_out} are not the UNet's "
                               f"{list(UNET_INPUTS)} / {list(UNET_OUTPUTS)}; re-export with dh-export")
        # The manifest's model config must describe this graph: a fixed dim that disagrees would fail
        # only at the first run, as ONNX Runtime's InvalidArgument.
        want = {spec.name: spec for spec in (*self.inputs, *self.outputs)}
        for arg in (*self.session.get_inputs(), *self.session.get_outputs()):
            expected = want[arg.name].shape
            got = tuple(arg.shape)
            if len(got) != len(expected) or any(isinstance(g, int) and e >= 0 and g != e
                                                for g, e in zip(got, expected)):
                raise BackendError(f"{self.path}: {arg.name} has shape {list(got)} but the manifest's model config "
                                   f"gives {list(expected)}; the manifest does not describe this ONNX, re-export "
                                   "with dh-export")

    def _feeds(self, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        b = args[0].shape[0]
        return {spec.name: t.detach().to(device=self.device, dtype=torch.float32).reshape(spec.concrete(b)).contiguous()
                for spec, t in zip(self.inputs, args)}

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """Shapes as ``unet_io_spec``; motion frames may also be ``[B, M, c, H, W]``. Returns ``[B, C_out, H, W]``."""
        feeds = self._feeds((x_t, timesteps, identity, motion_frames, audio_emb))
        if self.device.type == "cpu":
            out = self.session.run(list(UNET_OUTPUTS), {k: v.numpy() for k, v in feeds.items()})[0]
            return torch.from_numpy(out)
        return self._run_cuda(feeds, x_t.shape[0])

    def _run_cuda(self, feeds: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        index = self.device.index
        binding = self.session.io_binding()
        for name, t in feeds.items():
            binding.bind_input(name=name, device_type="cuda", device_id=index, element_type=np.float32,
                               shape=tuple(t.shape), buffer_ptr=t.data_ptr())
        out = self._out.get(batch)
        if out is None:
            out = self._out[batch] = torch.empty(self.outputs[0].concrete(batch), device=self.device)
        binding.bind_output(name=self.outputs[0].name, device_type="cuda", device_id=index,
                            element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        # ORT runs on the stream of its own given at creation: it waits for what torch's stream wrote (an
        # event, no host sync), and the run returns once its stream is done.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self.session.run_with_iobinding(binding)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
