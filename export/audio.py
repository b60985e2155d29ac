"""The audio encoder's part of a bundle: the SDA encoder as ONNX, or a record of the encoder expected.

The exported SDA unit is one window step, the authors' own calling convention:
``(window [B, 1, 3200], state [2, B, 256]) -> (emb [B, 256], state_out [2, B, 256])``; a runtime pads
the clip with 1280 zeros each side, steps over windows every 640 samples (one per 25 fps frame) and
carries the state from zeros. Each window collapses to a single GRU step, so the graph holds one GRU
op and no loop, and it streams (no need to hold the whole clip).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import torch
from torch import nn

from dheads.engine.backends.base import TensorSpec
from dheads.engine.bundle import AUDIO_ONNX, AudioEncoderRecord, sha256_file
from dheads.engine.config import AudioConfig, ModelConfig

from .errors import ExportError
from .to_onnx import DEFAULT_OPSET, FORBIDDEN_OPS, _quiet_exporter, all_nodes
from .verify import ORT_FP32, ParityError, combine, measure

log = logging.getLogger(__name__)

WINDOW, HOP, PAD = 3200, 640, 1280
STATE_LAYERS, STATE_DIM = 2, 256
AUDIO_INPUTS = (TensorSpec("window", (-1, 1, WINDOW)), TensorSpec("state", (STATE_LAYERS, -1, STATE_DIM)))
AUDIO_OUTPUTS = (TensorSpec("emb", (-1, STATE_DIM)), TensorSpec("state_out", (STATE_LAYERS, -1, STATE_DIM)))


class SDAStep(nn.Module):
    """One SDA window step with explicit GRU state: ``(window, state) -> (emb, state_out)``."""

    def __init__(self, sda: nn.Module):
        super().__init__()
        self.sda = sda

    def forward(self, window: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, _code, h = self.sda(window, None, state)
        return emb, h


def record_only(audio: AudioConfig, note: str) -> AudioEncoderRecord:
    """The bundle names the encoder the model expects but holds no exported encoder."""
    return AudioEncoderRecord(kind="record", encoder=audio.encoder, options={"note": note})


def audio_record(encoder_path: str | os.PathLike | None, audio: AudioConfig, model: ModelConfig, out_dir: Path, *,
                 opset: int = DEFAULT_OPSET, seed: int | None = None) -> AudioEncoderRecord:
    """Export the SDA encoder from ``encoder_path`` into ``out_dir/audio_encoder.onnx`` (verified), or record
    which encoder the model expects when no encoder file is given."""
    if encoder_path is None:
        note = ("pass the released audio_encoder.pt to dh-export --audio-encoder to bundle it"
                if audio.encoder == "sda" else f"run the {audio.encoder} encoder named in the audio config")
        return record_only(audio, note)
    encoder_path = Path(encoder_path)
    if not encoder_path.is_file():
        raise ExportError(f"{encoder_path}: no such audio encoder file")
    if audio.encoder != "sda":
        raise ExportError(f"this model expects {audio.encoder} audio features; --audio-encoder takes the SDA "
                          "audio_encoder.pt of SDA models only")
    if model.audio_dim != STATE_DIM:
        raise ExportError(f"this model takes {model.audio_dim}-d audio features but SDA gives {STATE_DIM}-d")
    return export_sda(encoder_path, audio, out_dir / AUDIO_ONNX, opset=opset, seed=seed)


def export_sda(encoder_path: Path, audio: AudioConfig, onnx_path: Path, *, opset: int = DEFAULT_OPSET,
               seed: int | None = None) -> AudioEncoderRecord:
    """The SDA window step as ONNX, checked against the eager encoder on random windows and states."""
    try:
        from dheads.engine.encoders.sda import EagerSDA
    except ImportError as e:  # the eager SDA module is not available in this install
        log.warning("eager SDA encoder unavailable (%s); recording the encoder only", e)
        return record_only(audio, "eager SDA encoder unavailable at export time")
    sda = EagerSDA.from_torchscript(encoder_path, AudioConfig(encoder="sda", sample_rate=audio.sample_rate,
                                                              fps=audio.fps, dim=audio.dim), verify=True)
    step = SDAStep(sda.module).eval()
    window = torch.randn(2, 1, WINDOW, generator=torch.Generator().manual_seed(0)) * 0.1
    state = torch.zeros(STATE_LAYERS, 2, STATE_DIM)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(step, (window, state), None, input_names=["window", "state"],
                                    output_names=["emb", "state_out"], opset_version=opset, dynamo=True,
                                    dynamic_shapes=({0: batch}, {1: batch}), optimize=True, verbose=False)
        program.save(str(onnx_path))
    _check_audio_graph(onnx_path)
    parity = _audio_parity(onnx_path, step, seed)
    return AudioEncoderRecord(
        kind="onnx", encoder="sda", file=onnx_path.name, inputs=AUDIO_INPUTS, outputs=AUDIO_OUTPUTS,
        options={"unit": "window_step", "window": WINDOW, "hop": HOP, "pad": PAD, "sample_rate": audio.sample_rate,
                 "state_init": "zeros", "source_name": encoder_path.name, "source_sha256": sha256_file(encoder_path),
                 "parity": parity})


def _check_audio_graph(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    bad = sorted({n.op_type for n in all_nodes(model)} & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{path.name}: graph holds control-flow/sequence ops {bad}")


@torch.no_grad()
def _audio_parity(path: Path, step: SDAStep, seed: int | None) -> dict:
    """ORT vs eager on 3 random windows from random states, then 4 chained steps (state carried)."""
    import onnxruntime as ort

    seed = secrets.randbits(31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stats: dict[str, object] = {"emb": None, "state_out": None}
    state_ref = state_ort = torch.zeros(STATE_LAYERS, 3, STATE_DIM)
    for i in range(5):
        window = torch.randn(3, 1, WINDOW, generator=gen) * 0.1
        if i == 0:
            state_ref = state_ort = torch.randn(STATE_LAYERS, 3, STATE_DIM, generator=gen) * 0.5
        emb_ref, state_ref = step(window, state_ref)
        emb, h = session.run(None, {"window": window.numpy(), "state": state_ort.numpy()})
        state_ort = torch.from_numpy(h)
        stats["emb"] = combine(stats["emb"], measure(torch.from_numpy(emb), emb_ref))
        stats["state_out"] = combine(stats["state_out"], measure(state_ort, state_ref))
    failed = [k for k, s in stats.items() if not s.passes(ORT_FP32)]
    if failed:
        s = stats[failed[0]]
        raise ParityError(f"audio encoder parity failed on {failed[0]}: max abs {s.max_abs:.3g}, rel {s.rel:.3g}")
    return {"seed": seed, "tolerance": {"rtol": ORT_FP32.rtol, "atol": ORT_FP32.atol},
            "outputs": {k: s.to_dict() for k, s in stats.items()}}
