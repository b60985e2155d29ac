"""The authors' SDA audio encoder (Vougioukas et al. 2020): 16 kHz samples -> [n_frames, 256].

The released ``audio_encoder.pt`` is TorchScript, run per window exactly as the authors do
(:func:`encode_windowed`): pad ``2 * 640`` zeros each side, cut windows of ``3200`` samples every
``640`` (one per 25 fps frame, centred on that frame), and call
``emb, _, h = enc(window [1, 1, 3200], LongTensor([3200]), init_state=h)`` with ``h [2, 1, 256]``
starting at zeros and carried from window to window.

:class:`SDAEncoder` is the same network as an eager ``nn.Module`` (weights copied from the file by
:func:`load_torchscript_weights`). Its :meth:`SDAEncoder.encode_clip` runs a whole clip at once (one
batched conv over all windows, then the GRU over the windows as one sequence), which is exactly the
per-window loop because each window collapses to a single GRU step; :class:`SDAClip` wraps that
for ONNX export.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from dheads.engine.audio import num_frames
from dheads.engine.config import AudioConfig
from dheads.engine.encoders import EncoderError

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
WINDOW = 5 * SAMPLES_PER_FRAME  # 3200 samples = 200 ms, frames i-2..i+2
PAD = 2 * SAMPLES_PER_FRAME  # 1280 zeros each side
STATE_SHAPE = (2, 1, 256)  # GRU layers, batch, hidden

# (in, out, kernel, stride, padding) of the five Conv1d + BatchNorm1d + ReLU blocks.
# Time length of one 3200-sample window through them (L_out = (L + 2p - k) // s + 1):
#   3200 -(k80 s16 p32)-> 200 -(k4 s2 p1)-> 100 -> 50 -> 25 -(k10 s5 p3)-> 5,
# then Conv1d(k5, no padding): 5 - 5 + 1 = 1. So every window becomes ONE 256-d code and the GRU
# advances ONE step per window; the state h carries context from frame to frame (25 Hz).
CONV_BLOCKS = (
    (1, 16, 80, 16, 32),
    (16, 32, 4, 2, 1),
    (32, 64, 4, 2, 1),
    (64, 128, 4, 2, 1),
    (128, 256, 10, 5, 3),
)


class SDAEncoder(nn.Module):
    """Eager SDA audio encoder. State-dict names: ``encoder.{0..5}.{0,1}.*`` and ``rnn.*``.

    ``encoder.0``-``encoder.4`` are Conv1d+BatchNorm1d+ReLU (see :data:`CONV_BLOCKS`),
    ``encoder.5`` is Conv1d(256, code_size, 5)+Tanh, ``rnn`` a 2-layer batch-first GRU.
    """

    def __init__(self, code_size: int = 256, hidden_size: int = 256, num_layers: int = 2):
        super().__init__()
        blocks = [
            nn.Sequential(nn.Conv1d(i, o, k, s, p), nn.BatchNorm1d(o), nn.ReLU())
            for i, o, k, s, p in CONV_BLOCKS
        ]
        blocks.append(nn.Sequential(nn.Conv1d(CONV_BLOCKS[-1][1], code_size, 5), nn.Tanh()))
        self.encoder = nn.Sequential(*blocks)
        self.rnn = nn.GRU(code_size, hidden_size, num_layers, batch_first=True)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, init_state: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step, the TorchScript's signature: ``x [B, 1, 3200]`` -> ``(emb [B, H], code [B, C], h)``.

        ``lengths`` (samples per item) is accepted for signature compatibility and unused: a
        3200-sample window is always one GRU step. ``init_state``/``h``: ``[layers, B, H]``.
        """
        code = self.encoder(x).transpose(1, 2)  # [B, T=1, C]
        out, h = self.rnn(code, init_state)
        return out[:, -1], code[:, -1], h

    def encode_clip(self, windows: torch.Tensor) -> torch.Tensor:
        """All windows of one clip: ``[N, 1, 3200] -> [N, H]``, state carried from zeros.

        One batched conv (BatchNorm in eval mode is per-sample, so batching changes nothing), then
        the N codes as ONE GRU sequence ``[1, N, C]``: step i starts from the state of step i-1,
        as in the per-window loop.
        """
        codes = self.encoder(windows)  # [N, C, 1]
        out, _ = self.rnn(codes.permute(2, 0, 1))  # [1, N, C] -> [1, N, H]
        return out[0]


class SDAClip(nn.Module):
    """Whole-clip wrapper for ONNX export: ``samples [n] -> [num_frames(n), 256]`` (n >= 640).

    Exports with a dynamic ``n`` through the TorchScript-based exporter
    (``torch.onnx.export(..., dynamo=False)``; the GRU becomes one ONNX ``GRU`` op). The dynamo
    exporter of torch 2.13 fails while decomposing ``aten.gru``.
    """

    def __init__(self, sda: SDAEncoder):
        super().__init__()
        self.sda = sda

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return self.sda.encode_clip(frame_windows(samples))


def frame_windows(samples: torch.Tensor, samples_per_frame: int = SAMPLES_PER_FRAME) -> torch.Tensor:
    """The authors' windows: ``[n] -> [num_frames(n), 1, 5 * spf]``; window i centred on frame i.

    Pads ``2 * spf`` zeros each side; window i is ``padded[i * spf : i * spf + 5 * spf]``, i.e.
    original samples ``(i - 2) * spf .. (i + 3) * spf``. Built from ``spf``-sample blocks with
    reshape + slices (not ``unfold``) so that ONNX export keeps ``n`` dynamic.
    """
    spf = samples_per_frame
    n = samples.shape[0] // spf  # == num_frames(n_samples, spf), see dheads.engine.audio
    padded = nn.functional.pad(samples, (2 * spf, 2 * spf))
    blocks = padded[: (n + 4) * spf].reshape(n + 4, spf)  # block j = padded[j*spf:(j+1)*spf]
    return torch.cat([blocks[j : j + n] for j in range(5)], dim=1).unsqueeze(1)


@torch.no_grad()
def encode_windowed(enc, samples: torch.Tensor, samples_per_frame: int = SAMPLES_PER_FRAME) -> torch.Tensor:
    """The authors' loop, for a TorchScript or eager encoder: ``samples [n] -> [num_frames(n), 256]``.

    One call per window with ``lengths = LongTensor([3200])`` and the GRU state carried across.
    """
    n = num_frames(samples.numel(), samples_per_frame)
    window = 5 * samples_per_frame
    padded = nn.functional.pad(samples, (2 * samples_per_frame, 2 * samples_per_frame))
    h = torch.zeros(STATE_SHAPE)
    embs = []
    for i in range(n):
        chunk = padded[i * samples_per_frame : i * samples_per_frame + window].view(1, 1, window)
        emb, _, h = enc(chunk, torch.LongTensor([window]), init_state=h)
        embs.append(emb.reshape(1, -1))
    if not embs:
        return torch.zeros(0, STATE_SHAPE[-1])
    return torch.cat(embs)


def load_torchscript_weights(eager: SDAEncoder, scripted_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy the released TorchScript's tensors into ``eager`` (in place).

    Same names: copied by name. Otherwise matched by order (``num_batches_tracked`` ignored on
    both sides), which is the module registration order in both; every shape must agree.
    Raises :class:`EncoderError` naming the first mismatch.
    """
    target = eager.state_dict()
    if set(scripted_state_dict) == set(target):
        pairs = [(name, name) for name in target]
    else:
        pairs = list(zip(_weights(target), _weights(scripted_state_dict)))
        if len(_weights(target)) != len(_weights(scripted_state_dict)):
            raise EncoderError(
                f"SDA weights: the file has {len(_weights(scripted_state_dict))} tensors, "
                f"SDAEncoder expects {len(_weights(target))}; the file is not the SDA audio encoder"
            )
    for dst, src in pairs:
        got, want = tuple(scripted_state_dict[src].shape), tuple(target[dst].shape)
        if got != want:
            raise EncoderError(
                f"SDA weights: {src} has shape {got} but {dst} needs {want}; "
                "the file is not the SDA audio encoder"
            )
    state = dict(target)
    state.update({dst: scripted_state_dict[src].detach().clone() for dst, src in pairs})
    eager.load_state_dict(state)
    log.debug("copied %d SDA tensors: %s", len(pairs), pairs)


def _weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state_dict if not k.endswith("num_batches_tracked")]


class TorchScriptSDA:
    """:class:`~dheads.engine.encoders.AudioEncoder` running the released ``audio_encoder.pt`` as is."""

    name = "sda"
    dim = 256

    def __init__(self, path: str | Path, config: AudioConfig | None = None):
        self._config = _check_config(config or AudioConfig())
        self.path = Path(path)
        self.module = _jit_load(self.path)

    @property
    def config(self) -> AudioConfig:
        return self._config

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """``samples [n]`` 16 kHz -> ``[num_frames(n), 256]`` float32, the authors' per-window loop."""
        return encode_windowed(self.module, _as_tensor(samples))


class EagerSDA:
    """:class:`~dheads.engine.encoders.AudioEncoder` on :class:`SDAEncoder` (whole-clip path)."""

    name = "sda"

    def __init__(self, module: SDAEncoder, config: AudioConfig | None = None):
        self._config = _check_config(config or AudioConfig())
        self.module = module.eval()
        self.dim = module.rnn.hidden_size

    @property
    def config(self) -> AudioConfig:
        return self._config

    @classmethod
    def from_torchscript(
        cls, path: str | Path, config: AudioConfig | None = None, verify: bool = True
    ) -> EagerSDA:
        """Copy the file's weights into :class:`SDAEncoder`; with ``verify``, check both agree.

        The check runs the file and the copy on a fixed 1 s probe signal (25 frames) and raises
        :class:`EncoderError` if any output differs by more than 1e-4.
        """
        scripted = _jit_load(Path(path))
        module = SDAEncoder()
        load_torchscript_weights(module, scripted.state_dict())
        encoder = cls(module, config)
        if verify:
            probe = _probe_signal()
            diff = float((encode_windowed(scripted, probe) - encoder.encode(probe)).abs().max())
            if not diff <= 1e-4:
                raise EncoderError(
                    f"{path}: eager copy differs from the TorchScript by {diff:.2e}; "
                    "use AudioConfig.options={'backend': 'torchscript'}"
                )
        return encoder

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """``samples [n]`` 16 kHz -> ``[num_frames(n), 256]`` float32 (whole clip at once)."""
        return self.encode(_as_tensor(samples))

    @torch.no_grad()
    def encode(self, samples: torch.Tensor) -> torch.Tensor:
        """``[n] -> [num_frames(n), 256]``: batched conv over all windows, GRU across them."""
        if num_frames(samples.numel()) == 0:
            return torch.zeros(0, self.dim)
        return self.module.encode_clip(frame_windows(samples))

    def windowed(self, samples: np.ndarray) -> torch.Tensor:
        """The authors' per-window loop on the eager module (reference for :meth:`encode`)."""
        return encode_windowed(self.module, _as_tensor(samples))


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still works
            return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise EncoderError(
            f"{path}: not a TorchScript file ({first}); pass the released audio_encoder.pt"
        ) from None


def _check_config(config: AudioConfig) -> AudioConfig:
    if config.encoder != "sda":
        raise EncoderError(f"AudioConfig.encoder is {config.encoder!r}, not 'sda'")
    if (config.sample_rate, config.fps, config.dim) != (16000, 25, 256):
        raise EncoderError(
            f"SDA works at 16 kHz, 25 fps, 256-d; AudioConfig has sample_rate={config.sample_rate}, "
            f"fps={config.fps}, dim={config.dim}; use AudioConfig(encoder='sda')"
        )
    return config


def _as_tensor(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """1-D float32 CPU tensor from a numpy array or tensor."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if x.ndim != 1:
        raise EncoderError(f"audio encoders take mono samples [n]; got shape {tuple(x.shape)}")
    return x


def _probe_signal(seconds: float = 1.0) -> torch.Tensor:
    """Deterministic speech-like probe: two tones plus seeded noise, 16 kHz."""
    t = torch.arange(int(16000 * seconds), dtype=torch.float64) / 16000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.2 * torch.sin(2 * torch.pi * 1700 * t) + 0.05 * noise
    return x.float()
