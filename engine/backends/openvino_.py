"""OpenVINO backend (CPU): runs a bundle's ONNX (``unet.onnx``, or ``unet_int8.onnx`` for int8) in f32 or bf16.

The model is reshaped to a static batch (measured on the demo: 47 ms static against 63 ms dynamic at f32, 28
against 30 ms at bf16) and compiled on first use; a batch runs as batch-1 calls unless ``per_sample=False``
(then each batch size gets its own compiled model), so a stream batched with others gives what it gives alone. Compiled blobs live in a cache folder named
by :func:`cache_key` (the ONNX's sha256, OpenVINO's version, the CPU, the precision), so a changed model, a
new OpenVINO or another CPU never reuses a stale blob; inside it, OpenVINO's own ``CACHE_DIR`` check adds
the graph and the compile settings.

OpenVINO's CPU plugin defaults to bf16 where the CPU has it: ``fp32`` sets ``INFERENCE_PRECISION_HINT`` to
f32 explicitly. An int8 model is the QDQ ONNX ``dh-export --precision int8`` writes (NNCF); OpenVINO runs its
quantized convolutions in int8 and the rest in bf16 where the CPU has it, else f32 (measured on the demo:
12.5 ms a call against 16.7 with the rest in f32 and 14.3 for bf16 alone; error vs fp32 0.034 either way, the
int8 convolutions' own). Outputs are always float32 torch tensors on the CPU.

One ``ov.Core`` per process (:func:`core`), made on first use and never released: with a second Core made and
queried while another existed (two denoisers, or ``--device auto``'s capability check beside the denoiser), the
process's heap was corrupted and a later, unrelated ``malloc`` died of SIGSEGV (the test suite's in-process
training then ``dh-run`` after the OpenVINO tests, 4 of 4 runs; 0 of 6 with one shared Core or with every Core
kept alive). Compile settings (precision, threads, cache folder) go to each ``compile_model`` call, so one Core
serves every model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from .artifact import ONNX_KINDS, Artifact, Runtime, plan_refusal
from .base import BackendError
from ..specs import UNET_INPUTS, UNET_OUTPUTS, unet_io_spec

log = logging.getLogger(__name__)

# precision name -> (OpenVINO's INFERENCE_PRECISION_HINT, the OPTIMIZATION_CAPABILITIES entry it needs)
OV_PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "int8": ("f32", "INT8")}


def import_openvino():
    """The ``openvino`` module, or BackendError (one line) saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BackendError("openvino is not installed; pip install 'diffused-heads[openvino]' "
                           "(or use --backend onnxruntime)") from None
    return openvino


_CORE = None
_CORE_LOCK = threading.Lock()


def core():
    """The process's one ``ov.Core`` (see the module docstring for why never two); BackendError without openvino."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


@dataclass(frozen=True)
class CpuInfo:
    """What OpenVINO says of the CPU: its name and the precisions it optimises for (``OPTIMIZATION_CAPABILITIES``)."""

    name: str
    capabilities: tuple[str, ...]

    @classmethod
    def of(cls, core) -> CpuInfo:
        return cls(name=str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                   capabilities=tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))


def check_precision_supported(precision: str, cpu: CpuInfo) -> None:
    """BackendError (one line) unless OpenVINO can compute in ``precision`` on ``cpu``."""
    if precision not in OV_PRECISIONS:
        raise BackendError(f"the openvino backend runs fp32, bf16 or int8, not {precision}")
    need = OV_PRECISIONS[precision][1]
    if need not in cpu.capabilities:
        raise BackendError(f"precision {precision} is unavailable on this CPU ({cpu.name}: OpenVINO reports "
                           f"{', '.join(cpu.capabilities) or 'no capabilities'}); use --precision fp32")


def cache_key(model_sha256: str, ov_version: str, cpu: CpuInfo, precision: str) -> str:
    """Names a compiled model's cache folder: any change of model, OpenVINO, CPU or precision gives a new one."""
    text = json.dumps([model_sha256, ov_version, cpu.name, sorted(cpu.capabilities), precision])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_root() -> Path:
    """``$DHEADS_CACHE/openvino``, else ``$XDG_CACHE_HOME/dheads/openvino``, else ``~/.cache/dheads/openvino``."""
    if os.environ.get("DHEADS_CACHE"):
        return Path(os.environ["DHEADS_CACHE"]) / "openvino"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dheads" / "openvino"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def accepts(artifact: Artifact) -> bool:
    """OpenVINO runs an exported ONNX: a bundle folder or an ``.onnx`` beside its manifest."""
    return artifact.kind in ONNX_KINDS


def refusal(artifact: Artifact) -> str:
    """Why not, where :func:`accepts` says no to an exported artifact (a plan)."""
    return plan_refusal(artifact, "openvino")


def open(artifact: Artifact, runtime: Runtime) -> tuple[OvDenoiser, str]:  # noqa: A001 - the backend protocol's name
    """OpenVINO over the artifact's ONNX (fp32 and bf16 from ``unet.onnx``, int8 from ``unet_int8.onnx``), on the
    CPU; ``device`` must be the CPU unless it was ``auto``."""
    if runtime.device.type != "cpu" and not runtime.auto_device:
        raise BackendError(f"the openvino backend runs on the CPU, not {runtime.device}; pass device='cpu'")
    onnx = artifact.onnx(runtime.precision)
    return OvDenoiser(onnx, artifact.manifest.model, precision=runtime.precision, threads=runtime.threads), \
        runtime.precision


class OvDenoiser:
    """``denoiser(x_t, timesteps, identity, motion_frames, audio_emb) -> model_out`` via OpenVINO on the CPU.

    ``precision``: fp32 | bf16 (``onnx_path`` an fp32 ONNX) or int8 (a QDQ ONNX). ``threads``: the engine's
    threads (``INFERENCE_NUM_THREADS``; None: OpenVINO's choice). One stream, latency hint, no core pinning
    (the machine is shared). ``cache``: a folder for compiled models (None: :func:`cache_root`).
    ``per_sample`` (default True): a batch runs as batch-1 calls, one per sample, so each stream of a batch gets
    what it gets alone (OpenVINO's kernels for another static batch round differently: batch 2's first row vs
    batch 1 differed by 1e-6 at fp32 and 3e-8 at int8 on the demo, grown to whole pixel levels over a video);
    False: one call at the batch's own shape.
    """

    name = "openvino"
    graph_safe = False

    def __init__(self, onnx_path: str | os.PathLike, config: ModelConfig, *, precision: str = "fp32",
                 threads: int | None = None, cache: str | os.PathLike | None = None, per_sample: bool = True):
        ov = import_openvino()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file")
        self.device, self.config, self.precision = torch.device("cpu"), config, precision
        self.per_sample = per_sample
        self.inputs, self.outputs = unet_io_spec(config)
        self.core = core()
        self.cpu = CpuInfo.of(self.core)
        check_precision_supported(precision, self.cpu)
        self.key = cache_key(_sha256(self.path), ov.__version__, self.cpu, precision)
        self.cache_dir = Path(cache) if cache is not None else cache_root() / self.key
        hint = "bf16" if precision == "int8" and "BF16" in self.cpu.capabilities else OV_PRECISIONS[precision][0]
        self.settings = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                         "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False, "CACHE_DIR": str(self.cache_dir)}
        if threads:
            self.settings["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"{self.path}: OpenVINO cannot read it ({_first_line(e)})") from None
        self._check_io()
        self._requests: dict[int, object] = {}
        self._lock = threading.Lock()  # an InferRequest is not thread-safe: one call at a time (dh-serve's threads)
        self._write_key_note(ov.__version__)
        self._request(1)  # compile batch 1 now: errors belong to open, not to the first frame
        log.info("openvino %s %s on %s (cache %s)", ov.__version__, precision, self.cpu.name, self.cache_dir)

    def _check_io(self) -> None:
        got_in = [p.get_any_name() for p in self.model.inputs]
        got_out = [p.get_any_name() for p in self.model.outputs]
        if sorted(got_in) != sorted(UNET_INPUTS) or got_out != list(UNET_OUTPUTS):
            raise BackendError(f"{self.path}: inputs {got_in} / outputs {got_out} are not the UNet's "
                               f"{list(UNET_INPUTS)} / {list(UNET_OUTPUTS)}; re-export with dh-export")
        want = {spec.name: spec.shape for spec in self.inputs}
        for port in self.model.inputs:
            shape = port.get_partial_shape()
            expected = want[port.get_any_name()]
            fixed = [None if d.is_dynamic else d.get_length() for d in shape]
            if len(fixed) != len(expected) or any(g is not None and e >= 0 and g != e for g, e in zip(fixed, expected)):
                raise BackendError(f"{self.path}: {port.get_any_name()} has shape {shape} but the manifest's model "
                                   f"config gives {list(expected)}; re-export with dh-export")

    def _write_key_note(self, version: str) -> None:
        """What the cache folder holds, for a person looking at it (the folder's name is the key)."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            note = {"model": str(self.path.resolve()), "openvino": version, "cpu": self.cpu.name,
                    "capabilities": list(self.cpu.capabilities), "precision": self.precision, "key": self.key}
            (self.cache_dir / "key.json").write_text(json.dumps(note, indent=2) + "\n")
        except OSError as e:
            log.warning("openvino cache %s not writable (%s): compiling without it", self.cache_dir, e)
            self.settings.pop("CACHE_DIR", None)

    def _request(self, batch: int):
        """The infer request of the model compiled for ``batch`` (compiled, or loaded from the cache, once)."""
        req = self._requests.get(batch)
        if req is None:
            model = self.model.clone()
            model.reshape({spec.name: list(spec.concrete(batch)) for spec in self.inputs})
            try:
                compiled = self.core.compile_model(model, "CPU", self.settings)
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"{self.path}: OpenVINO cannot compile it for {self.precision} "
                                   f"({_first_line(e)})") from None
            req = self._requests[batch] = compiled.create_infer_request()
        return req

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """Shapes as ``unet_io_spec``; motion frames may also be ``[B, M, c, H, W]``. Returns float32 ``[B, C_out, H, W]``."""
        b = x_t.shape[0]
        feeds = {spec.name: t.detach().to(device="cpu", dtype=torch.float32).reshape(spec.concrete(b)).contiguous().numpy()
                 for spec, t in zip(self.inputs, (x_t, timesteps, identity, motion_frames, audio_emb))}
        rows = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(b)] if self.per_sample else [feeds]
        outs = []
        with self._lock:  # two threads on one request corrupt each other's outputs (seen in dh-serve's tests)
            for feed in rows:
                req = self._request(next(iter(feed.values())).shape[0])
                req.infer(feed)
                outs.append(np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True))
        return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
