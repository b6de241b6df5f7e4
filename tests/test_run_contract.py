"""The run contract: a cross-validation written by ``capsedge train`` is read by export, by the
evaluation reader and by the benches through the same code (:mod:`capsedge.workshop.run`), and
its file names are those every earlier run has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge.cli import main
from capsedge.workshop.run import CrossValidation, RunDir

from conftest import bench_script, synthetic_xray

pytest.importorskip("tensorflow")

#: What a fold of ``capsedge train --folds K`` holds; renaming any orphans every earlier run.
FOLD_FILES = {"classifier.keras", "config.json", "metrics.json", "history.csv", "holdout_indices.npy",
              "holdout_probabilities.npy", "holdout_probabilities_views.npy", "learning_curves.png"}
FINAL_FILES = {"classifier.keras", "config.json", "metrics.json", "history.csv", "learning_curves.png"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[CrossValidation, Path]:
    """Two folds and a final run of the smallest model on sixteen generated pictures."""
    data = tmp_path_factory.mktemp("data")
    for i in range(8):
        Image.fromarray(synthetic_xray(seed=i)).save(data / f"Depuy.{i}.jpg")
        Image.fromarray(np.rot90(synthetic_xray(seed=100 + i))).save(data / f"Zimmer.{i}.png")
    out = tmp_path_factory.mktemp("cv") / "cv"
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), "--model",
                                       "effcaps_mnist", "--epochs", "1", "--batch-size", "4", "--folds", "2",
                                       "--final"])
    assert result.exit_code == 0, result.output
    return CrossValidation(out), data


@pytest.mark.slow
def test_the_trainer_writes_the_files_the_contract_names(trained: tuple) -> None:
    cv, _ = trained
    assert {cv.settings.name, cv.summary.name} == {"cv_settings.json", "cv_summary.json"}
    assert cv.settings.is_file() and cv.read_summary()["folds"] == 2
    assert [fold.path.name for fold in cv.folds()] == ["fold-0", "fold-1"]
    for fold in cv.folds():
        assert {p.name for p in fold.path.iterdir()} >= FOLD_FILES, fold
        assert fold.is_finished() and not fold.missing()
        for name in FOLD_FILES:
            assert name in {p.name for p in (fold.classifier, fold.config, fold.metrics, fold.history,
                                             fold.holdout_indices, fold.holdout_probabilities,
                                             fold.views_file(), fold.learning_curves)}
    assert {p.name for p in cv.final.path.iterdir()} >= FINAL_FILES and cv.final.is_finished()
    assert CrossValidation.above(cv.final) == cv


@pytest.mark.slow
def test_export_and_the_benches_read_the_same_answers(trained: tuple, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The out-of-fold answers the trainer summarised, a reader's of the folder, the export's
    calibration and the int8 fold scores of ``capsedge export --score-folds`` and of
    ``bench/heldout_int8.py`` are one reading of the same files."""
    from capsedge.export.run import load_run, trust_sources
    from capsedge.workshop.dataset import read_dataset

    cv, data = trained
    indices, probabilities = cv.out_of_fold(16)
    np.testing.assert_array_equal(CrossValidation(cv.path).out_of_fold(16)[1], probabilities)
    pooled = np.concatenate([fold.read_holdout_probabilities() for fold in cv.folds()])
    np.testing.assert_array_equal(probabilities, pooled)
    assert trust_sources(cv.final.path, None, None)[:2] == (cv.path, data)
    assert load_run(cv.final.classifier).provenance["training"] == cv.final.read_config()["train"]

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--model", str(cv.final.path), "--out", str(out),
                                       "--formats", "tflite-f32,tflite-int8", "--calib", str(data),
                                       "--score-folds", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert cv.has_views("int8")
    trust = json.loads((out / "trust.json").read_text())
    assert trust["out_of_fold_images"] == 16
    int8 = json.loads((out / "effcaps_mnist_tflite_int8.json").read_text())["trust"]["provenance"]
    assert int8["calibrated_on"] == "the held-out answers of the folds' int8 files"
    f32 = json.loads((out / "effcaps_mnist_tflite_f32.json").read_text())["trust"]["provenance"]
    assert f32["out_of_fold_images"] == 16 and "calibrated_on" not in f32  # the float folds' answers
    # sixteen views: the trainer's float answers and the int8 files' hold all sixteen
    assert cv.fold(0).read_views().shape[1] == cv.fold(0).read_views("int8").shape[1] == 16
    final = str(cv.final.path)
    sixteen = CliRunner().invoke(main, ["export", "--model", final, "--out", str(tmp_path / "16"),
                                        "--formats", "tflite-f32,tflite-int8", "--calib", str(data),
                                        "--test-time-views", "16", "--no-verify"])
    assert sixteen.exit_code == 0, sixteen.output
    for name in ("effcaps_mnist_tflite_int8.json", "effcaps_mnist_tflite_f32.json"):
        written = json.loads((tmp_path / "16" / name).read_text())
        assert written["test_time_views"] == 16 and written["trust"]["provenance"]["test_time_views"] == 16

    bench = bench_script("heldout_int8", monkeypatch)
    fold = cv.fold(1)
    measured = bench.measure_fold(fold.path, read_dataset(data), ["int8"])
    saved = fold.read_views("int8")
    assert saved.shape == (len(fold.read_holdout_indices()), 16, 2) and saved.dtype == np.float32
    np.testing.assert_array_equal(measured["answers"]["int8", 8], saved[:, :8].mean(1).argmax(1))
    np.testing.assert_array_equal(measured["answers"]["int8", 16], saved.mean(1).argmax(1))
    np.testing.assert_array_equal(measured["truth"], read_dataset(data).targets[fold.read_holdout_indices()])
    assert isinstance(RunDir.of(fold.classifier), RunDir)


@pytest.mark.slow
def test_turned_views_bench_scores_the_folds_saved_views_turned(trained: tuple,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/turned_views.py``: turned by 0 degrees the views are the fold's saved ones (eight, or
    all sixteen with ``views=16``); turned a quarter, the same eight views in another order, so the
    same average; as float and as int8."""
    from capsedge.workshop.dataset import read_dataset

    cv, data = trained
    bench = bench_script("turned_views", monkeypatch)
    fold, dataset = cv.fold(1), read_dataset(data)
    every = fold.read_views()
    assert every.shape[1] == 16
    np.testing.assert_allclose(bench.fold_turned_views(fold, dataset, 0.0, 16), every, atol=1e-5)
    saved = every[:, :8]
    np.testing.assert_allclose(bench.fold_turned_views(fold, dataset, 0.0), saved, atol=1e-5)
    quarter = bench.fold_turned_views(fold, dataset, 90.0)
    assert not np.allclose(quarter, saved, atol=1e-3)  # another order of the views
    np.testing.assert_allclose(quarter.mean(1), saved.mean(1), atol=1e-5)
    truth = dataset.targets[fold.read_holdout_indices()]
    scores = bench.accuracies(saved, quarter, truth)
    assert scores["8 views"] == scores["8 turned views"] == scores["16 views"]
    assert scores["8 views"] == round(float(np.mean(saved.mean(1).argmax(1) == truth)), 4)
    upright, int8_quarter = bench.fold_int8_views(fold, dataset, 90.0)  # the int8 file, as export scores it
    assert not np.array_equal(int8_quarter, upright)  # turned: another order of the views
    np.testing.assert_allclose(np.sort(int8_quarter, axis=1), np.sort(upright, axis=1), atol=1e-6)
    upright16, unturned16 = bench.fold_int8_views(fold, dataset, 0.0, 16)  # thirty-two views' halves
    assert upright16.shape == unturned16.shape == (len(truth), 16, 2)
    np.testing.assert_allclose(unturned16, upright16, atol=1e-6)
    assert set(bench.accuracies(upright16, unturned16, truth)) == {"16 views", "16 turned views", "32 views"}
