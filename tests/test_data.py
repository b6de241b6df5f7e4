"""Reading the three data layouts, and the metrics and splits of training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge.train.metrics import classification_report, stratified_folds, stratified_split
from capsedge.workshop.dataset import DatasetError, read_dataset

from conftest import implant_data, synthetic_xray


def _save(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_xray(seed=seed)).save(path)


def test_flat_layout(tmp_path: Path) -> None:
    for name in ("Depuy.1.jpg", "Depuy.2.jpg", "Zimmer.10.jpg"):
        _save(tmp_path / name)
    (tmp_path / "README.txt").write_text("ignored")
    data = read_dataset(tmp_path)
    assert data.layout == "flat" and data.classes == ("Depuy", "Zimmer")
    assert data.counts() == {"Depuy": 2, "Zimmer": 1}
    assert data.targets.tolist() == [0, 0, 1]


def test_folder_per_class_layout(tmp_path: Path) -> None:
    _save(tmp_path / "Tornier" / "a.png")
    _save(tmp_path / "Cofield" / "b.png")
    _save(tmp_path / "Cofield" / "c.png")
    data = read_dataset(tmp_path)
    assert data.layout == "folders" and data.counts() == {"Cofield": 2, "Tornier": 1}


def test_csv_layout_with_relative_paths_and_header(tmp_path: Path) -> None:
    _save(tmp_path / "img" / "1.png")
    _save(tmp_path / "img" / "2.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/1.png,Depuy\nimg/2.png,Zimmer\n")
    data = read_dataset(csv)
    assert data.layout == "csv" and data.labels == ("Depuy", "Zimmer")
    csv.write_text("img/1.png,Depuy\nimg/3.png,Zimmer\n")
    with pytest.raises(DatasetError, match="row 2: image not found"):
        read_dataset(csv)


def test_unusable_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no images"):
        read_dataset(tmp_path)
    _save(tmp_path / "Depuy.1.jpg")
    with pytest.raises(DatasetError, match="two classes"):
        read_dataset(tmp_path)


def test_development_data_layout() -> None:
    data = read_dataset(implant_data())
    assert data.layout == "flat"
    assert data.classes == ("Cofield", "Depuy", "Tornier", "Zimmer")
    assert sum(data.counts().values()) == len(data.paths) >= 400
    # The four makers' names prove nothing about where the images came from: no guessed credit.
    assert "UCI" not in data.attribution()
    assert "CC BY 4.0" in data.with_attribution("uci-517").attribution()


def test_attribution_only_from_a_flag_or_a_manifest(tmp_path: Path) -> None:
    for name in ("Cofield.1.jpg", "Depuy.1.jpg", "Tornier.1.jpg", "Zimmer.1.jpg"):
        _save(tmp_path / name)
    data = read_dataset(tmp_path)
    assert data.attribution() == "trained on user-supplied images (provenance not given)"
    assert data.source == tmp_path.resolve()
    assert data.with_attribution("Hospital X, internal").attribution() == \
        "trained on images from the Hospital X, internal"
    (tmp_path / "capsedge-data.json").write_text(json.dumps({"attribution": "My set, CC0"}))
    assert read_dataset(tmp_path).attribution() == "trained on images from the My set, CC0"
    assert read_dataset(tmp_path).subset(np.array([0])).credit == "My set, CC0"
    (tmp_path / "capsedge-data.json").write_text("{")
    with pytest.raises(DatasetError, match="cannot read"):
        read_dataset(tmp_path)


def test_report_by_hand() -> None:
    report = classification_report(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_splits_are_stratified_and_disjoint() -> None:
    targets = np.array([0] * 50 + [1] * 20 + [2] * 10)
    train, held = stratified_split(targets, 0.2, seed=3)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 80
    assert np.bincount(targets[held]).tolist() == [10, 4, 2]
    folds = stratified_folds(targets, 5, seed=3)
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(80))
    for _, val in folds:
        assert np.bincount(targets[val], minlength=3).tolist() == [10, 4, 2]


def test_metrics_agree_with_scikit_learn() -> None:
    """The hand-written report is the standard one (to the last bit but F1's, see metrics.py)."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, n = int(rng.integers(2, 6)), int(rng.integers(1, 60))
        targets, predictions = rng.integers(0, k, n), rng.integers(0, k, n)
        labels = list(range(k))
        report = classification_report(targets, predictions, [str(i) for i in labels])
        precision, recall, f1, support = metrics.precision_recall_fscore_support(
            targets, predictions, labels=labels, zero_division=0)
        per_class = [report["per_class"][str(i)] for i in labels]
        assert [c["precision"] for c in per_class] == precision.tolist()
        assert [c["recall"] for c in per_class] == recall.tolist()
        assert [c["support"] for c in per_class] == support.tolist()
        np.testing.assert_allclose([c["f1"] for c in per_class], f1, rtol=0, atol=1e-15)
        matrix = metrics.confusion_matrix(targets, predictions, labels=labels)
        assert report["confusion_matrix"] == matrix.tolist()
        assert report["accuracy"] == metrics.accuracy_score(targets, predictions)
