"""`capsedge bench`: the figures are produced and shaped as documented; and the bench/ scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from capsedge.bench import benchmark
from capsedge.cli import main

from conftest import bench_script


def test_benchmark_measures_the_bundled_model() -> None:
    result = benchmark(None, runs=20, warmup=2)
    assert result.backend == "litert" and result.threads == 1 and result.runs == 20 and result.views == 16
    assert 0 < result.median_ms <= result.p90_ms <= result.p99_ms
    assert result.throughput > 0 and result.load_ms > 0 and result.preprocess_ms > 0
    assert 10 < result.peak_rss_mb < 4096
    with pytest.raises(ValueError, match="runs"):
        benchmark(None, runs=0)


def test_bench_command_json_rows_per_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsedge import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)  # show even this quick work
    result = CliRunner().invoke(main, ["bench", "--json", "--runs", "5", "--warmup", "1", "--threads", "1,2"])
    assert result.exit_code == 0, result.stderr
    assert [line.split(" (")[0] for line in result.stderr.splitlines()][-1] == "bench auto, 2 threads: 6/6"
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["threads"] for row in rows] == [1, 2]
    assert set(rows[0]) == {"backend", "threads", "load_ms", "preprocess_ms", "views", "median_ms", "p90_ms",
                            "p99_ms", "throughput", "peak_rss_mb", "runs"}


def test_bench_command_table_and_errors() -> None:
    result = CliRunner().invoke(main, ["bench", "--runs", "3", "--warmup", "0"])
    assert result.exit_code == 0 and "median ms" in result.stdout and "litert" in result.stdout
    bad = CliRunner().invoke(main, ["bench", "--runs", "3", "--backend", "nope"])
    assert bad.exit_code == 1 and "unknown backend 'nope'" in bad.stderr
    bad = CliRunner().invoke(main, ["bench", "--threads", "one"])
    assert bad.exit_code == 1 and "comma-separated integers" in bad.stderr
    for threads in ("0", "100000", ","):
        bad = CliRunner().invoke(main, ["bench", "--threads", threads])
        assert bad.exit_code == 1 and "from 1 to 64" in bad.stderr


# bench/: one runner, shared --data/--out options, no script writing or reading outside them.

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("CAPSEDGE_DATA", "CAPSEDGE_MNIST")}
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], capture_output=True, text=True,
                          timeout=120, env={**environment, **(env or {})})


def test_the_runner_lists_every_script_and_the_archive() -> None:
    listed = run_bench()
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  ")}
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common", "run", "arm64_env"}
    archived = {p.stem for p in (BENCH / "archive").glob("*.py")}
    assert scripts <= names and archived <= names and archived
    assert not names & {"common", "run", "arm64_env"}
    unknown = run_bench("no_such_script")
    assert unknown.returncode == 1 and unknown.stderr.strip().startswith("bench: no script 'no_such_script'")


def test_no_bench_script_names_the_shared_data_folder() -> None:
    for script in [*BENCH.glob("*.py"), *(BENCH / "archive").glob("*.py")]:
        source = script.read_text()
        assert '"shared"' not in source and "/shared/" not in source, script.name


def test_data_comes_from_the_option_or_the_environment(tmp_path: Path) -> None:
    missing = run_bench("classify_process", "--runs", "1")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "bench: no data folder: give --data DIR or set CAPSEDGE_DATA"
    empty = run_bench("classify_process", "--runs", "1", env={"CAPSEDGE_DATA": str(tmp_path)})
    assert empty.returncode == 1 and "no Depuy.5.jpg in" in empty.stderr


def test_a_script_writes_only_into_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_bench("model_macs", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "model_macs.json").read_text())
    assert sum(result["macs"].values()) > 1e9 and result["model"] == "default.tflite"
    assert [p.name for p in tmp_path.rglob("*")] == ["out", "model_macs.json"]


#: What a script's source holds when it loads TensorFlow in its own process (Keras, a trained run,
#: the converter, the training's view predictions).
LOADS_TENSORFLOW = ("import keras", "load_run", "score_folds", "predict_views", "keras_to_tflite")


def test_scripts_that_load_tensorflow_keep_its_start_up_lines_off_the_terminal(tmp_path: Path) -> None:
    """Each such script runs its ``main`` through ``common.quietly``;
    one run for real: ``int8_report`` imports Keras, then fails on a folder that is no run, and
    stderr holds its one-line error and no line of TensorFlow's C++ start-up."""
    for script in BENCH.glob("*.py"):
        source = script.read_text()
        if any(marker in source for marker in LOADS_TENSORFLOW):
            assert "common.quietly(main)" in source, script.name
    pytest.importorskip("tensorflow")
    failed = run_bench("int8_report", "--run", str(tmp_path / "none"), "--data", str(tmp_path))
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [f"bench: no trained model at {tmp_path / 'none'}"]


def test_heldout_int8_names_the_formats_it_knows_before_reading_anything(tmp_path: Path) -> None:
    wrong = run_bench("heldout_int8", "--cv", str(tmp_path), "--data", str(tmp_path),
                      "--formats", "int8,int9")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1].endswith(
        "--formats: 'int9' is not one of int8, dynamic, float16, int8-trunk, int8-head")


def test_heldout_int8_summary_scores_each_average_both_models_have(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accuracy, macro-F1 and agreement per average of views; sixteen only where the float
    answers have it too (a fold saved before 0.7 holds eight)."""
    bench = bench_script("heldout_int8", monkeypatch)
    truth = np.array([0, 0, 1, 1])
    answers = {("float", 8): np.array([0, 0, 1, 1]), ("int8", 8): np.array([0, 1, 1, 1]),
               ("int8", 16): np.array([0, 0, 0, 1])}
    scores = bench.summary(truth, answers, ["int8"], ("a", "b"))
    assert scores["float_accuracy_8_views"] == scores["float_macro_f1_8_views"] == 1.0
    assert scores["int8_accuracy_8_views"] == scores["int8_agreement_8_views"] == 0.75
    assert scores["int8_macro_f1_8_views"] == round((2 / 3 + 0.8) / 2, 4)  # F1 of "a" 2/3, of "b" 0.8
    assert not any("16" in key for key in scores)


def test_prior_shift_chooses_each_folds_tau_on_the_other_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that answers the rare class too seldom is mended by dividing out the prior: the
    smallest tau that flips 0.4 against 0.6 with priors 0.25 and 0.75 is 0.4 (log 1.5 / log 3)."""
    bench = bench_script("prior_shift", monkeypatch)
    prior = np.array([0.75, 0.25])
    fold = (np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]]), np.array([0, 0, 1]))
    assert bench.shifted(fold[0], prior, 0.0).argmax(1).tolist() == [0, 0, 0]
    assert bench.shifted(fold[0], prior, 1.0).argmax(1).tolist() == [0, 0, 1]
    accuracy, taus = bench.nested_accuracy([fold, fold, fold], prior)
    assert accuracy == 1.0 and taus == [0.4, 0.4, 0.4]
    # A fold the shift would harm: it keeps the others at tau 0 (2 of 3 right each), and they
    # choose 0.4 for it, which turns both its answers wrong: 4 of 8, the cost of tuning tau.
    costly = (np.array([[0.6, 0.4], [0.6, 0.4]]), np.array([0, 0]))
    accuracy, taus = bench.nested_accuracy([fold, fold, costly], prior)
    assert taus == [0.0, 0.0, 0.4] and accuracy == 4 / 8


def test_head_average_chooses_each_folds_weight_on_the_other_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two heads that err on different images: their plain average is right where either is
    sure; a fold whose best weight differs pays for the weight the others chose."""
    bench = bench_script("head_average", monkeypatch)
    first = np.array([[0.9, 0.1], [0.45, 0.55], [0.3, 0.7]])  # wrong on the second image
    second = np.array([[0.4, 0.6], [0.9, 0.1], [0.3, 0.7]])  # wrong on the first
    fold = (first, second, np.array([0, 0, 1]))
    assert bench.mixed(fold, 0.0).tolist() == [0, 1, 1] and bench.mixed(fold, 1.0).tolist() == [1, 0, 1]
    assert bench.mixed(fold, 0.5).tolist() == [0, 0, 1]
    accuracy, weights = bench.nested_accuracy([fold, fold, fold])
    assert accuracy == 1.0 and weights == [0.5, 0.5, 0.5]  # 0.3 to 0.7 all score 3; 0.5 is nearest
    # An image only the first head gets right, and only for w < 3/7: with it among the others a
    # fold chooses 0.4 (the others all right); its own fold gets 0.5 and loses it.
    alone = (np.array([[0.8, 0.2]]), np.array([[0.1, 0.9]]), np.array([0]))
    accuracy, weights = bench.nested_accuracy([fold, fold, alone])
    assert weights == [0.4, 0.4, 0.5] and accuracy == 6 / 7


def test_outlier_choice_fits_each_folds_statistics_without_its_held_out_images(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold whose held-out images are far from its training images flags them all; were they
    in the fit, the 99th percentile would cover some. The folds' counts are pooled."""
    bench = bench_script("outlier_choice", monkeypatch)
    rng = np.random.default_rng(0)
    near = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 30)) + 0.1 * rng.normal(size=(300, 30))
    far = np.concatenate([near[:250], near[250:] + 3.0])
    held = np.arange(250, 300)
    assert bench.held_out_flagged([(far, held)], components=3) == 1.0
    assert (alone := bench.held_out_flagged([(near, held)], components=3)) < 0.1
    assert bench.held_out_flagged([(far, held), (near, held)], components=3) == pytest.approx((1 + alone) / 2)
    assert bench.flagged_share(near, far[250:], components=3) == 1.0


def test_heldout_int8_reads_the_saved_int8_answers_and_means_the_folds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``saved``, a fold's int8 answers come from the file the export's scoring saved (no
    classifier is loaded: this fold has none); the mean over folds is the headline's form."""
    from types import SimpleNamespace

    from capsedge.workshop.run import RunDir

    bench = bench_script("heldout_int8", monkeypatch)
    run = RunDir(tmp_path)
    held = np.array([2, 0, 1])
    float_views = np.tile(np.eye(2, dtype=np.float32)[[0, 0, 1]][:, None], (1, 16, 1))
    int8_views = float_views.copy()
    int8_views[2] = [0.9, 0.1]  # the third image flips to class 0 in every view
    np.save(run.holdout_indices, held)
    run.save_views(float_views)
    run.save_views(int8_views, "int8")
    dataset = SimpleNamespace(targets=np.array([0, 1, 0]))
    measured = bench.measure_fold(tmp_path, dataset, ["int8"], saved=True)
    assert measured["truth"].tolist() == [0, 0, 1]
    assert measured["answers"]["float", 16].tolist() == [0, 0, 1]
    assert measured["answers"]["int8", 16].tolist() == [0, 0, 0]
    scores = bench.summary(measured["truth"], measured["answers"], ["int8"], ("a", "b"))
    assert scores["int8_accuracy_16_views"] == round(2 / 3, 4) and scores["float_accuracy_16_views"] == 1.0

    means = bench.mean_over_folds([{"int8_accuracy_16_views": 0.8}, {"int8_accuracy_16_views": 0.9}],
                                  {"images": 190, "int8_accuracy_16_views": 0.85})
    assert means == {"int8_accuracy_16_views": 0.85, "int8_accuracy_16_views_std": round(0.1 / 2 ** 0.5, 4)}


def test_readout_sides_counts_what_happens_where_the_sides_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/readout_sides.py``: only images whose sides answer differently are counted."""
    bench = bench_script("readout_sides", monkeypatch)
    truth = np.array([0, 1, 2, 3, 0])
    answers = {"caps": np.array([0, 1, 1, 3, 2]), "readout": np.array([0, 2, 2, 0, 1]),
               "fused": np.array([0, 1, 2, 0, 2])}
    assert bench.disagreements(answers, truth) == {"images": 4, "caps right": 2, "readout right": 1,
                                                   "fused is caps": 2, "fused right": 2}
