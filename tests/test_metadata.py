"""Model metadata: embedded in .tflite, in a sidecar, validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsedge.errors import ModelError
from capsedge.metadata import (
    ModelMetadata,
    embed_in_tflite,
    read_embedded,
    read_metadata,
    read_sidecar,
    sidecar_path,
)
from capsedge.preprocess import Preprocessing

METADATA = ModelMetadata(
    name="effcaps_test",
    version="1.2.3",
    labels=("Cofield", "Depuy", "Tornier", "Zimmer"),
    preprocessing=Preprocessing(input_size=64),
    provenance={"attribution": "UCI 517, CC BY 4.0", "metrics": {"accuracy": 0.5}},
)


def test_json_round_trip() -> None:
    assert ModelMetadata.from_dict(json.loads(METADATA.to_json())) == METADATA


def test_embed_keeps_flatbuffer_bytes_and_replaces_older_metadata(tmp_path: Path) -> None:
    model = tmp_path / "m.tflite"
    payload = b"TFL3" + bytes(range(256)) * 8
    model.write_bytes(payload)
    embed_in_tflite(model, METADATA)
    assert model.read_bytes().startswith(payload)
    assert read_embedded(model) == METADATA
    newer = ModelMetadata("effcaps_test", "2.0", METADATA.labels, METADATA.preprocessing)
    embed_in_tflite(model, newer)
    data = model.read_bytes()
    assert data.startswith(payload) and data.count(b"capsedge_metadata.json") == 2  # one archive
    assert read_metadata(model).version == "2.0"


def test_sidecar_is_read_when_nothing_is_embedded(tmp_path: Path) -> None:
    model = tmp_path / "plain.tflite"
    model.write_bytes(b"TFL3")
    with pytest.raises(ModelError, match="no capsedge metadata"):
        read_metadata(model)
    sidecar_path(model).write_text(METADATA.to_json())
    assert sidecar_path(model).name == "plain.json"
    assert read_sidecar(model) == METADATA
    assert read_metadata(model) == METADATA


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not capsedge model metadata"),
        ('{"format": "capsedge-model", "format_version": 99}', "version 99"),
        ('{"format": "capsedge-model", "format_version": 1, "name": "x"}', "invalid model metadata"),
    ],
)
def test_invalid_sidecar_is_a_model_error(tmp_path: Path, text: str, message: str) -> None:
    model = tmp_path / "bad.tflite"
    model.write_bytes(b"TFL3")
    sidecar_path(model).write_text(text)
    with pytest.raises(ModelError, match=message):
        read_metadata(model)


def test_labels_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        ModelMetadata("x", "1", ("a", "a"), Preprocessing(input_size=64))


def test_labels_must_be_a_list() -> None:
    data = json.loads(METADATA.to_json())
    data["labels"] = "CDTZ"
    with pytest.raises(ModelError, match="labels must be a list"):
        ModelMetadata.from_dict(data)
