"""The export bundle: a directory of exported engines plus the manifest that says what they are.

``dh-export`` writes it; the runtime reads it through :func:`read_manifest` alone (this module imports
nothing from ``dheads.export``). A bundle holds:

* ``manifest.json``: :class:`Manifest` (configs, I/O specs, batch profile, precision, hashes, versions);
* ``unet.onnx``: the fp32 UNet, static image size, dynamic batch axis ``batch``;
* ``unet_fp16.onnx`` (``--precision fp16``): the same graph in fp16 with fp32 I/O, GroupNorm, softmax and
  timestep embedding (what a strongly typed TensorRT network is built from);
* ``unet_int8.onnx`` (``--precision int8``): a QDQ ONNX quantized by NNCF on real calls of the fp32 UNet
  (:class:`Int8Record`: what calibrated it and how close it stays to fp32); ONNX Runtime and OpenVINO run it;
* ``unet.plan`` + ``timing.cache`` where TensorRT was available at export time;
* ``audio_encoder.onnx`` when the SDA encoder was exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .specs import BatchProfile, TensorSpec
from .config import AudioConfig, DiffusionConfig, ModelConfig
from .names import PRECISIONS

FORMAT = "dheads-bundle"
VERSION = 1

MANIFEST = "manifest.json"
UNET_ONNX = "unet.onnx"
UNET_ONNX_FP16 = "unet_fp16.onnx"
UNET_ONNX_INT8 = "unet_int8.onnx"
UNET_PLAN = "unet.plan"
TIMING_CACHE = "timing.cache"
AUDIO_ONNX = "audio_encoder.onnx"


class BundleError(ValueError):
    """A bundle or manifest that is missing, unreadable or of another format (one-line message)."""


@dataclass(frozen=True)
class BundleFile:
    """One file of the bundle, by name relative to the bundle directory."""

    name: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, directory: str | os.PathLike, name: str) -> BundleFile:
        path = Path(directory) / name
        return cls(name=name, sha256=sha256_file(path), bytes=path.stat().st_size)


@dataclass(frozen=True)
class TensorRTRecord:
    """How ``unet.plan`` was built. A plan only runs on the TensorRT version and GPU it was built for.

    ``typing``: ``"strong"`` (strongly typed network from ``unet_fp16.onnx``) or ``"weak"`` (fp32 ONNX with
    the FP16 builder flag and fp32 precision constraints on norms and softmax). ``precision`` matches the
    manifest's.
    """

    version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    plan_sha256: str
    typing: str
    onnx_file: str
    precision: str
    plan_file: str = UNET_PLAN
    timing_cache_file: str | None = TIMING_CACHE
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorRTRecord:
        d = dict(d)
        d["compute_capability"] = tuple(d["compute_capability"])
        return cls(**d)


@dataclass(frozen=True)
class Int8Record:
    """How ``unet_int8.onnx`` was made: from which fp32 ONNX (name, sha256), by what (``method``, ``tools``),
    calibrated on what (``calibration``: sources with their hashes, the sampler and timesteps, call counts) and
    how close it stays to fp32 on real calls held back from calibration (``parity``). JSON values only."""

    file: str
    source_file: str
    source_sha256: str
    method: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Record:
        return cls(**d)


@dataclass(frozen=True)
class AudioEncoderRecord:
    """The audio encoder the model expects: exported (``kind="onnx"``, ``file`` set) or only named.

    ``encoder`` is the :class:`AudioConfig` encoder name. ``options`` carries what a runtime needs to
    drive the exported unit (window, hop, padding, state shape, parity numbers) as JSON values.
    """

    kind: str  # "onnx" | "record"
    encoder: str
    file: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "file": self.file,
                "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
                "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioEncoderRecord:
        return cls(kind=d["kind"], encoder=d["encoder"], file=d.get("file"),
                   inputs=tuple(TensorSpec.from_dict(s) for s in d.get("inputs", ())),
                   outputs=tuple(TensorSpec.from_dict(s) for s in d.get("outputs", ())),
                   options=dict(d.get("options") or {}))


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to drive the bundle's engines, and what they were made from.

    ``verification`` holds the parity numbers measured at export time (JSON values only);
    ``tools`` the versions of the libraries that made the files.
    """

    model: ModelConfig
    audio: AudioConfig
    diffusion: DiffusionConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: BatchProfile
    precision: str
    source_sha256: str
    source_name: str = ""
    source_kind: str = ""
    opset: int = 18
    tools: dict[str, str] = field(default_factory=dict)
    files: tuple[BundleFile, ...] = ()
    verification: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTRecord | None = None
    audio_encoder: AudioEncoderRecord | None = None
    training: dict[str, Any] = field(default_factory=dict)  # what trained it: {"speakers": [...], "clips": [...]}
    int8: Int8Record | None = None
    created: str = ""
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BundleError(f"manifest precision must be one of {PRECISIONS}, got {self.precision!r}")

    def file(self, name: str) -> BundleFile | None:
        """The record of file ``name``, or None when the bundle does not hold it."""
        return next((f for f in self.files if f.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "model": self.model.to_dict(),
            "audio": self.audio.to_dict(),
            "diffusion": self.diffusion.to_dict(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "profile": self.profile.to_dict(),
            "precision": self.precision,
            "opset": self.opset,
            "source": {"name": self.source_name, "kind": self.source_kind, "sha256": self.source_sha256},
            "tools": dict(self.tools),
            "files": [dataclasses.asdict(f) for f in self.files],
            "verification": self.verification,
            "tensorrt": self.tensorrt.to_dict() if self.tensorrt else None,
            "audio_encoder": self.audio_encoder.to_dict() if self.audio_encoder else None,
            "training": self.training or None,
            **({"int8": self.int8.to_dict()} if self.int8 else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        src = d.get("source") or {}
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            audio=AudioConfig.from_dict(d["audio"]),
            diffusion=DiffusionConfig.from_dict(d["diffusion"]),
            inputs=tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(s) for s in d["outputs"]),
            profile=BatchProfile(**d["profile"]),
            precision=d["precision"],
            source_sha256=src.get("sha256", ""),
            source_name=src.get("name", ""),
            source_kind=src.get("kind", ""),
            opset=d.get("opset", 18),
            tools=dict(d.get("tools") or {}),
            files=tuple(BundleFile(**f) for f in d.get("files", ())),
            verification=d.get("verification") or {},
            tensorrt=TensorRTRecord.from_dict(d["tensorrt"]) if d.get("tensorrt") else None,
            audio_encoder=AudioEncoderRecord.from_dict(d["audio_encoder"]) if d.get("audio_encoder") else None,
            training=dict(d.get("training") or {}),
            int8=Int8Record.from_dict(d["int8"]) if d.get("int8") else None,
            created=d.get("created", ""),
            format=d.get("format", FORMAT),
            version=d.get("version", VERSION),
        )


def manifest_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a file, else ``path/manifest.json``."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` as JSON to ``path`` (a bundle directory or a file), atomically."""
    path = manifest_path(path)
    return atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read the manifest of a bundle directory (or a manifest file); BundleError with one line if bad."""
    path = manifest_path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no manifest (not an export bundle made by dh-export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({_first_line(e)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if data.get("version", 0) > VERSION:
        raise BundleError(f"{path}: bundle version {data['version']} is newer than this package understands "
                          f"({VERSION}); upgrade diffused-heads")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {_first_line(e)})") from None




def verify_file(bundle: str | os.PathLike, manifest: Manifest, name: str) -> Path:
    """``bundle/name``, after checking it is the file the manifest records (``Manifest.files``): its size
    first (a stat), then its sha256 (about 11 ms for the 11 MB demo; a verified hash is remembered by
    (path, size, mtime), in this process and under the cache folder, so re-opening a bundle costs a stat).
    BundleError (one line: the file, expected vs found) when it was replaced or damaged. A file the
    manifest does not record (a plan built later, a bundle from before ``files``) is not checked."""
    path = Path(bundle) / name
    record = manifest.file(name)
    if record is None:
        return path
    try:
        st = path.stat()
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({_first_line(e)})") from None
    if st.st_size != record.bytes:
        raise BundleError(f"{path}: {st.st_size} bytes, but the manifest records {record.bytes} bytes "
                          f"(sha256 {record.sha256[:12]}); the file was replaced or damaged, re-export with dh-export")
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    if _verified_hash(key) != record.sha256:
        digest = sha256_file(path)
        if digest != record.sha256:
            raise BundleError(f"{path}: sha256 {digest[:12]}, but the manifest records {record.sha256[:12]} (same "
                              f"size, {st.st_size} bytes); the file was replaced or damaged, re-export with dh-export")
        _remember_hash(key, digest)
    return path


_VERIFIED: dict[str, str] = {}  # (path, size, mtime) key -> sha256 verified in this process


def _hash_cache_file(key: str) -> Path:
    """Where a verified hash is remembered across processes: ``$DHEADS_CACHE/verified/<hash of the key>``
    (else ``$XDG_CACHE_HOME/dheads``, else ``~/.cache/dheads``)."""
    root = os.environ.get("DHEADS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dheads"
    return Path(root) / "verified" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _verified_hash(key: str) -> str | None:
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        return _hash_cache_file(key).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _remember_hash(key: str, digest: str) -> None:
    _VERIFIED[key] = digest
    try:
        cache = _hash_cache_file(key)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, digest + "\n")
    except OSError:
        pass  # a read-only home: verified again next time


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
