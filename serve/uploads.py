"""Client uploads: kept in a server-owned temp dir under server-chosen names, then validated by the engine.

No name a client sends is ever used as a path: a file is stored as ``<kind><suffix>`` in a fresh
``tempfile.mkdtemp`` directory, where ``suffix`` comes from the bytes' magic number (images) or from the
client's name only when it is a short alphanumeric extension. Errors keep dh-run's one-line messages,
with the temp path replaced by the client's (display-only, sanitised) file name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
STALE_AFTER_S = 3600.0
_OURS = re.compile(r"dh-serve-(?:videos-)?([0-9]+)-")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"BM", ".bmp"), (b"GIF8", ".gif"))
_SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


class LimitError(ValueError):
    """An upload over the server's caps (answered 413)."""


class RequestError(ValueError):
    """A malformed request: a missing part, a bad option, a bad message (answered 400)."""


def display_name(name: str | None, kind: str) -> str:
    """The client's file name for messages only: its last component, printable, at most 80 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(c for c in base if c.isprintable() and c not in "\"'`")[:80].strip()
    return base or kind


def choose_suffix(data: bytes, name: str | None) -> str:
    """A suffix for stored bytes: from the magic number, else the client's extension if safe, else ``.bin``."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    suffix = Path(display_name(name, "")).suffix.lower()
    return suffix if _SAFE_SUFFIX.fullmatch(suffix) else ".bin"


@dataclass
class Upload:
    """One stored upload: where the server put it and how to name it back to the client."""

    path: Path
    shown: str

    def explain(self, err: BaseException) -> str:
        """The engine's one-line message with the temp path replaced by the client's file name."""
        text = " ".join(str(err).split())
        return text.replace(str(self.path), self.shown)


class UploadDir:
    """A temp directory for one request's files; removed by :meth:`close`."""

    def __init__(self, root: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=root))

    def save(self, kind: str, data: bytes, client_name: str | None, *, max_bytes: int) -> Upload:
        if kind not in ("face", "audio"):
            raise ValueError(f"unknown upload kind {kind!r}")
        if not data:
            raise RequestError(f"{kind}: empty upload")
        if len(data) > max_bytes:
            raise LimitError(f"{kind}: upload is over {max_bytes} bytes, this server's limit")
        path = self.path / f"{kind}{choose_suffix(data, client_name)}"
        path.write_bytes(data)
        return Upload(path, display_name(client_name, kind))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> UploadDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def temp_prefix(kind: str = "") -> str:
    """``dh-serve-[videos-]<pid>-``: a server's temp folders name its process, so ``remove_stale`` can tell
    a dead server's folders from a live one's."""
    return f"dh-serve-{kind}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(root: str | Path | None = None, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove the temp folders of servers that died (a crash leaves its uploads and videos behind): those
    named for a process that no longer runs and untouched for ``older_than_s``. Returns how many."""
    removed = 0
    for d in Path(root or tempfile.gettempdir()).glob("dh-serve-*"):
        m = _OURS.match(d.name)
        if m is None or not d.is_dir() or _alive(int(m[1])):
            continue
        if time.time() - d.stat().st_mtime < older_than_s:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d temp folder(s) left by a dh-serve that stopped", removed)
    return removed


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit mono PCM -> float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise RequestError(f"PCM chunk of {len(data)} bytes is not whole 16-bit samples")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> little-endian signed 16-bit PCM bytes."""
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()
