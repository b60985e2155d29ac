"""The SDA encoder a bundle carries: ``audio_encoder.onnx`` (one window step) run with ONNX Runtime.

``dh-export --audio-encoder audio_encoder.pt`` exports the authors' calling convention as a graph
``(window [B, 1, 3200], state [2, B, 256]) -> (emb [B, 256], state_out [2, B, 256])`` and records how to
drive it (window, hop, padding) in the manifest. :class:`OnnxSDA` drives it exactly as the authors'
loop does (:func:`dheads.engine.encoders.sda.encode_windowed`): pad ``pad`` zeros each side, one window
every ``hop`` samples, the GRU state carried from zeros, so a bundle needs no ``audio_encoder.pt``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dheads.engine.audio import num_frames
from dheads.engine.config import AudioConfig
from dheads.engine.encoders import EncoderError

log = logging.getLogger(__name__)


class OnnxSDA:
    """:class:`~dheads.engine.encoders.AudioEncoder` on a bundle's exported SDA window step."""

    name = "sda"

    def __init__(self, path: str | Path, config: AudioConfig, options: dict):
        import onnxruntime as ort

        self.path = Path(path)
        self._config = config
        try:
            self.window, self.hop, self.pad = int(options["window"]), int(options["hop"]), int(options["pad"])
        except (KeyError, TypeError, ValueError):
            raise EncoderError(f"{self.path}: the manifest does not say how to drive it (window, hop, pad); "
                               "re-export the bundle") from None
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise EncoderError(f"{self.path}: ONNX Runtime cannot load it ({str(e).strip()[:160]})") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != ["window", "state"]:
            raise EncoderError(f"{self.path}: inputs {names} are not the SDA window step's ['window', 'state']")
        state = self.session.get_inputs()[1].shape  # [layers, batch, hidden]
        self.state_shape = (int(state[0]), 1, int(state[2]))
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        if self.dim != config.dim:
            raise EncoderError(f"{self.path}: gives {self.dim}-d features, the audio config says {config.dim}-d")

    @property
    def config(self) -> AudioConfig:
        return self._config

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """``samples [n]`` 16 kHz -> ``[num_frames(n), dim]`` float32: one session run per window."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise EncoderError(f"audio encoders take mono samples [n]; got shape {tuple(x.shape)}")
        n = num_frames(x.size, self.hop)
        padded = np.pad(x, (self.pad, self.pad))
        state = np.zeros(self.state_shape, np.float32)
        out = np.empty((n, self.dim), np.float32)
        for i in range(n):
            window = np.ascontiguousarray(padded[i * self.hop: i * self.hop + self.window]).reshape(1, 1, -1)
            emb, state = self.session.run(None, {"window": window, "state": state})
            out[i] = emb[0]
        return torch.from_numpy(out)


def bundled_encoder(manifest, bundle: str | Path) -> OnnxSDA | None:
    """The exported encoder a bundle holds (None when it only records which encoder it expects).

    The file must be the one the manifest lists (same sha256): a swapped or damaged file is an EncoderError.
    """
    from dheads.engine.bundle import sha256_file

    record = manifest.audio_encoder
    if record is None or record.kind != "onnx" or not record.file:
        return None
    path = Path(bundle) / record.file
    if not path.is_file():
        raise EncoderError(f"{bundle}: the bundle's {record.file} is missing; copy the whole bundle, or pass "
                           "--audio-encoder")
    listed = manifest.file(record.file)
    if listed is not None and sha256_file(path) != listed.sha256:
        raise EncoderError(f"{path}: differs from the file the manifest lists (sha256); re-export the bundle")
    log.info("audio encoder: %s from the bundle (ONNX Runtime)", record.file)
    return OnnxSDA(path, manifest.audio, record.options)
