"""Model metadata: labels, preprocessing, version and provenance, stored with every model.

A ``.tflite`` file carries its metadata as a ZIP archive appended to the
flatbuffer (the same trick TFLite's own metadata writer uses for associated
files: interpreters ignore trailing bytes, ``zipfile`` finds the archive from
the end). An ``.onnx`` file carries it in the model's ``metadata_props`` under
the key ``capsedge_metadata``. Every model also gets a sidecar ``<stem>.json``
beside it, which is read when nothing is embedded.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, RuntimeMissingError, preview, reason
from .limits import (
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_NAME_LENGTH,
)
from .onnx_runtime import onnxruntime_options
from .preprocess import Preprocessing
from .trust import Trust
from .views import VIEW_COUNTS

FORMAT = "capsedge-model"
FORMAT_VERSION = 1
EMBEDDED_NAME = "capsedge_metadata.json"
ONNX_METADATA_KEY = "capsedge_metadata"


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
        trust: calibration and out-of-distribution statistics (see :mod:`capsedge.trust`);
            ``None`` for a model exported without them.
        test_time_views: how many orientations of an image the runtime averages the
            probabilities over (1, 4, 8 or 16; see :mod:`capsedge.views`); the calibration in
            ``trust`` was fitted for that average.
    """

    name: str
    version: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    provenance: dict[str, Any] = field(default_factory=dict)
    trust: Trust | None = None
    test_time_views: int = 1

    def __post_init__(self) -> None:
        _check_text("name", self.name, MAX_NAME_LENGTH)
        _check_text("version", self.version, MAX_NAME_LENGTH)
        if not isinstance(self.labels, tuple) or not 2 <= len(self.labels) <= MAX_LABELS:
            raise ValueError(f"labels must be 2 to {MAX_LABELS} names, got {preview(self.labels)}")
        for label in self.labels:
            _check_text("each label", label, MAX_LABEL_LENGTH)
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct names, got {preview(self.labels)}")
        if not isinstance(self.preprocessing, Preprocessing):
            raise ValueError("preprocessing must be a Preprocessing")
        if not isinstance(self.provenance, dict):
            raise ValueError(f"provenance must be an object, got {preview(self.provenance)}")
        if type(self.test_time_views) is not int or self.test_time_views not in VIEW_COUNTS:
            views = preview(self.test_time_views)
            raise ValueError(f"test_time_views must be one of {VIEW_COUNTS}, got {views}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        data = {
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_dict(),
            "test_time_views": self.test_time_views,
            "provenance": self.provenance,
        }
        if self.trust is not None:
            data["trust"] = self.trust.to_dict()
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
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ModelError(
                f"metadata format version {preview(version)} is not supported "
                f"(this capsedge reads version {FORMAT_VERSION})"
            )
        if not isinstance(data.get("labels"), list):
            labels = preview(data.get("labels"))
            raise ModelError(f"invalid model metadata: labels must be a list, got {labels}")
        if not isinstance(data.get("preprocessing"), dict):
            raise ModelError("invalid model metadata: preprocessing must be an object")
        try:
            return cls(
                name=data["name"],
                version=data["version"],
                labels=tuple(data["labels"]),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                provenance=data.get("provenance", {}),
                trust=Trust.from_dict(data["trust"]) if "trust" in data else None,
                test_time_views=data.get("test_time_views", 1),
            )
        except KeyError as exc:
            raise ModelError(f"invalid model metadata: {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"invalid model metadata: {exc}") from None


def _check_text(what: str, value: object, max_length: int) -> None:
    """A non-empty single-line string of printable characters, at most ``max_length`` long."""
    if not (isinstance(value, str) and value.strip() == value and 0 < len(value) <= max_length
            and value.isprintable()):
        raise ValueError(
            f"{what} must be a non-empty single-line string of at most {max_length} printable "
            f"characters, without surrounding spaces; got {preview(value)}"
        )


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


def read_embedded(model_path: str | Path,
                  onnx_properties: dict[str, str] | None = None) -> ModelMetadata | None:
    """Metadata embedded in a ``.tflite`` or ``.onnx`` file, or ``None`` when there is none
    (``onnx_properties``: an ``.onnx`` file's ``metadata_props`` if a loaded session has them)."""
    if Path(model_path).suffix.lower() == ".onnx":
        try:
            properties = onnx_properties
            if properties is None:
                properties = read_onnx_metadata_props(model_path)
        except (ModelError, RuntimeMissingError, OSError):
            return None
        text = properties.get(ONNX_METADATA_KEY)
        return None if text is None else ModelMetadata.from_dict(_parse_json(text, "embedded metadata"))
    try:
        with zipfile.ZipFile(model_path) as zf, zf.open(EMBEDDED_NAME) as member:
            # Bounded by what is inflated, not by the sizes the archive claims (zip bombs).
            data = member.read(MAX_METADATA_BYTES + 1)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError, zlib.error):
        return None
    if len(data) > MAX_METADATA_BYTES:
        raise ModelError(f"embedded metadata is too large (over {MAX_METADATA_BYTES // 1024} KiB inflated)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError("embedded metadata is not UTF-8 text") from None
    return ModelMetadata.from_dict(_parse_json(text, "embedded metadata"))


def read_onnx_metadata_props(model_path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model, as onnxruntime reads them
    (``get_modelmeta().custom_metadata_map``; the ``onnx`` extra, needed to run the file at all).

    Raises:
        ModelError: onnxruntime cannot load the file, or its metadata is too large.
        RuntimeMissingError: onnxruntime is not installed.
    """
    ort, options = onnxruntime_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        properties = dict(session.get_modelmeta().custom_metadata_map)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors share no base class
        reason = (str(exc).strip().splitlines() or ["onnxruntime cannot read it"])[0]
        raise ModelError(f"not a valid ONNX model ({reason})") from None
    if sum(len(k) + len(v) for k, v in properties.items()) > MAX_METADATA_BYTES:
        raise ModelError(f"model metadata is too large (over {MAX_METADATA_BYTES // 1024} KiB)")
    return properties


def read_sidecar(model_path: str | Path) -> ModelMetadata | None:
    """Metadata from the sidecar JSON, or ``None`` when there is no sidecar."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"cannot read {path.name} ({reason(exc)})") from None
    if len(data) > MAX_METADATA_BYTES:
        raise ModelError(f"{path.name} is too large (over {MAX_METADATA_BYTES // 1024} KiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path.name} is not UTF-8 text") from None
    return ModelMetadata.from_dict(_parse_json(text, path.name))


def _parse_json(text: str, what: str) -> dict[str, Any]:
    too_deep = ModelError(f"{what} is nested too deeply (over {MAX_METADATA_DEPTH} levels)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{what} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise too_deep from None
    if _depth(data) > MAX_METADATA_DEPTH:
        raise too_deep
    return data


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_METADATA_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest


def read_metadata(model_path: str | Path, onnx_properties: dict[str, str] | None = None) -> ModelMetadata:
    """The model's metadata: embedded first, else the sidecar JSON (``onnx_properties``: see
    :func:`read_embedded`).

    Raises:
        ModelError: the model has neither, or what it has is invalid.
    """
    metadata = read_embedded(model_path, onnx_properties) or read_sidecar(model_path)
    if metadata is None:
        raise ModelError(
            f"model has no capsedge metadata (nothing embedded and no {sidecar_path(model_path).name})"
        )
    return metadata
