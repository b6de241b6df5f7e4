"""Model metadata: labels, preprocessing, version and provenance, stored with every model.

A ``.tflite`` file carries its metadata as a ZIP archive appended to the
flatbuffer (the same trick TFLite's own metadata writer uses for associated
files: interpreters ignore trailing bytes, ``zipfile`` finds the archive from
the end). Every model also gets a sidecar ``<stem>.json`` beside it, which is
read when nothing is embedded.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError
from .preprocess import Preprocessing

FORMAT = "capsedge-model"
FORMAT_VERSION = 1
EMBEDDED_NAME = "capsedge_metadata.json"


@dataclass(frozen=True)
class ModelMetadata:
    """What the runtime needs to know about a model, and where it came from.

    Attributes:
        name: the model configuration's registry name.
        version: the model's own version string.
        labels: class names, in the order of the model's outputs.
        preprocessing: how the input tensor is made from an image.
        provenance: free-form facts: training data summary, attribution,
            recipe, metrics, quantization, exporter versions.
    """

    name: str
    version: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be at least two distinct names, got {self.labels!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["preprocessing"] = self.preprocessing.to_dict()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Parse and validate the JSON form.

        Raises:
            ModelError: it is not capsedge metadata, or a field is missing or invalid.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelError("metadata is not capsedge model metadata")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"metadata format version {data.get('format_version')!r} is not supported "
                f"(this capsedge reads version {FORMAT_VERSION})"
            )
        try:
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                labels=tuple(str(label) for label in data["labels"]),
                preprocessing=Preprocessing.from_dict(dict(data["preprocessing"])),
                provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"invalid model metadata ({type(exc).__name__}: {exc})") from None


def sidecar_path(model_path: str | Path) -> Path:
    """The sidecar JSON that belongs to a model file: ``<stem>.json`` beside it."""
    return Path(model_path).with_suffix(".json")


def embed_in_tflite(model_path: str | Path, metadata: ModelMetadata) -> None:
    """Append the metadata to a ``.tflite`` file as a ZIP archive (replacing any earlier one)."""
    path = Path(model_path)
    flatbuffer = path.read_bytes()
    archive = _find_archive_offset(flatbuffer)
    if archive is not None:
        flatbuffer = flatbuffer[:archive]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(EMBEDDED_NAME, metadata.to_json())
    path.write_bytes(flatbuffer + buffer.getvalue())


def _find_archive_offset(data: bytes) -> int | None:
    """Where an appended capsedge archive starts in ``data``, if there is one."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            # zipfile corrects header offsets for data before the archive; the
            # archive's only member starts it.
            return zf.getinfo(EMBEDDED_NAME).header_offset
    except (zipfile.BadZipFile, KeyError, OSError):
        return None


def read_embedded(model_path: str | Path) -> ModelMetadata | None:
    """Metadata embedded in a ``.tflite`` file, or ``None`` when there is none."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            text = zf.read(EMBEDDED_NAME).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError):
        return None
    return ModelMetadata.from_dict(_parse_json(text, "embedded metadata"))


def read_sidecar(model_path: str | Path) -> ModelMetadata | None:
    """Metadata from the sidecar JSON, or ``None`` when there is no sidecar."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path.name} ({exc})") from None
    return ModelMetadata.from_dict(_parse_json(text, path.name))


def _parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{what} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def read_metadata(model_path: str | Path) -> ModelMetadata:
    """The model's metadata: embedded first, else the sidecar JSON.

    Raises:
        ModelError: the model has neither, or what it has is invalid.
    """
    metadata = read_embedded(model_path) or read_sidecar(model_path)
    if metadata is None:
        raise ModelError(
            f"model has no capsedge metadata (nothing embedded and no {sidecar_path(model_path).name})"
        )
    return metadata
