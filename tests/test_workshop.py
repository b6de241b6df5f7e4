"""The workshop's floor: the run-folder contract and the image reader's decode-once cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge.errors import CapsedgeError
from capsedge.preprocess import Preprocessing
from capsedge.workshop.dataset import DatasetError, ImageCache, label_of, read_dataset
from capsedge.workshop.run import CrossValidation, RunDir, average_views, views_name

from conftest import REPO, synthetic_xray

#: Runs trained before the contract was written down; read here, never written.
EXISTING_RUNS = [REPO.parent / "main" / "runs" / name for name in ("stage1-gpu", "stage2-caps")]


def test_the_file_names_are_those_every_run_has() -> None:
    """Renaming one would orphan every run trained so far."""
    run = RunDir(Path("r"))
    assert {p.name for p in (run.classifier, run.config, run.metrics, run.history, run.holdout_indices,
                             run.holdout_probabilities, run.views_file(), run.views_file("int8"),
                             run.trunk, run.decoder, run.learning_curves, run.backup)} == {
        "classifier.keras", "config.json", "metrics.json", "history.csv", "holdout_indices.npy",
        "holdout_probabilities.npy", "holdout_probabilities_views.npy",
        "holdout_probabilities_views_int8.npy", "trunk.npz", "decoder.keras", "learning_curves.png",
        "backup"}
    cv = CrossValidation(Path("cv"))
    assert (cv.settings.name, cv.summary.name, cv.fold(3).path.name, cv.final.path.name) == (
        "cv_settings.json", "cv_summary.json", "fold-3", "final")
    assert cv.part("final") == cv.final and cv.part(2) == cv.part("2") == cv.fold(2)
    assert views_name("dynamic") == "holdout_probabilities_views_dynamic.npy"


def test_a_run_is_found_from_its_folder_or_its_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert RunDir.of(tmp_path) == RunDir.of(run.classifier) == run
    assert run.missing() == ["classifier.keras", "config.json"]
    run.write_config({"classes": ["a", "b"]})
    assert run.read_config() == {"classes": ["a", "b"]} and run.missing() == ["classifier.keras"]
    assert run.config.read_text(encoding="utf-8") == '{\n  "classes": [\n    "a",\n    "b"\n  ]\n}\n'
    assert run.read_metrics() == {} and not run.is_finished()
    run.write_metrics({"accuracy": 1.0})
    assert run.is_finished()
    run.backup.mkdir()
    assert not run.is_finished()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial left


def fake_cross_validation(folder: Path, sizes: tuple[int, ...] = (2, 3)) -> tuple[CrossValidation, list]:
    cv = CrossValidation(folder)
    rng = np.random.default_rng(0)
    every, start = [], 0
    for k, size in enumerate(sizes):
        fold = cv.fold(k)
        fold.path.mkdir(parents=True)
        views = rng.dirichlet(np.ones(3), size=(size, 8))
        fold.save_holdout(np.arange(start, start + size), views[:, 0], views)
        every.append(views)
        start += size
    return cv, every


def test_out_of_fold_answers_read_one_view_or_the_average(tmp_path: Path) -> None:
    cv, every = fake_cross_validation(tmp_path)
    indices, one = cv.out_of_fold(5)
    assert indices.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(one, np.concatenate([v[:, 0] for v in every]))
    _, four = cv.out_of_fold(5, views=4)
    np.testing.assert_allclose(four, np.concatenate([v[:, :4].mean(1) for v in every]))
    assert cv.has_views() and not cv.has_views("int8")
    with pytest.raises(CapsedgeError, match="fold-0 has no holdout_probabilities_views_int8.npy"):
        cv.out_of_fold(5, fmt="int8")
    for fold, views in zip(cv.folds(), every, strict=True):
        fold.save_views(views[:, :, ::-1], "int8")
    assert cv.has_views("int8")
    np.testing.assert_allclose(cv.out_of_fold(5, views=4, fmt="int8")[1],
                               np.concatenate([v[:, :4, ::-1].mean(1) for v in every]))
    with pytest.raises(CapsedgeError, match="do not cover the 6 training images"):
        cv.out_of_fold(6)
    cv.fold(1).views_file().unlink()
    with pytest.raises(CapsedgeError, match="fold-1 has no holdout_probabilities_views.npy for 8"):
        cv.out_of_fold(5, views=8)
    with pytest.raises(CapsedgeError, match="no fold-"):
        CrossValidation(tmp_path / "none").out_of_fold(5)


def test_averaging_views_refuses_what_it_cannot_do() -> None:
    views = np.ones((2, 4, 3))
    assert average_views(views, 4).shape == (2, 3)
    with pytest.raises(ValueError, match="cannot average 5 views"):
        average_views(views, 5)


def test_a_final_run_knows_its_cross_validation(tmp_path: Path) -> None:
    cv = CrossValidation(tmp_path)
    cv.final.path.mkdir()
    assert CrossValidation.above(cv.final) is None
    cv.write_summary({"folds": 2})
    assert CrossValidation.above(cv.final) == cv and cv.read_summary() == {"folds": 2}


@pytest.mark.parametrize("folder", EXISTING_RUNS, ids=lambda p: p.name)
def test_existing_runs_stay_readable(folder: Path) -> None:
    """The cross-validations trained before the contract existed read through it (read only)."""
    if not (folder / "cv_summary.json").is_file():
        pytest.skip(f"no run at {folder}")
    cv = CrossValidation(folder)
    folds = cv.folds()
    assert folds and all(not fold.missing(RunDir.CONFIG, RunDir.METRICS) for fold in [*folds, cv.final])
    classes = cv.final.read_config()["classes"]
    images = sum(len(fold.read_holdout_indices()) for fold in folds)
    indices, probabilities = cv.out_of_fold(images)
    assert probabilities.shape == (images, len(classes)) and sorted(indices) == list(range(images))
    assert cv.read_summary()["folds"] == len(folds)
    if cv.has_views():
        assert cv.out_of_fold(images, views=4)[1].shape == (images, len(classes))


def test_label_of_reads_both_layouts() -> None:
    labels = ("Depuy", "Zimmer")
    assert label_of(Path("x/Zimmer/a.png"), labels) == 1
    assert label_of(Path("x/Depuy.3.jpg"), labels) == 0
    assert label_of(Path("x/other.png"), labels) == -1


def test_images_are_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import capsedge.workshop.dataset as dataset_module

    for name in ("Depuy.1.png", "Zimmer.1.png"):
        Image.fromarray(synthetic_xray(seed=len(name))).save(tmp_path / name)
    (tmp_path / "Zimmer.2.png").write_bytes(b"not an image")
    decoded = []
    real = dataset_module.preprocess
    monkeypatch.setattr(dataset_module, "preprocess", lambda p, c: decoded.append(p) or real(p, c))
    cache = ImageCache(Preprocessing(input_size=16))
    paths = list(read_dataset(tmp_path).paths[:2])
    first = cache.images(paths)
    again = cache.images([tmp_path / ".." / tmp_path.name / "Depuy.1.png", *paths])
    assert len(decoded) == 2 and len(cache) == 2 and first.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(again[1:], first)
    np.testing.assert_array_equal(again[0], real(paths[0], cache.preprocessing))
    with pytest.raises(DatasetError, match="calibration image .*Zimmer.2.png"):
        cache.image(tmp_path / "Zimmer.2.png", "calibration image")


def test_a_run_written_with_json_reads_back(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"x": 1}))
    assert RunDir(tmp_path).read_config() == {"x": 1}
