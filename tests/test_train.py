"""Training: a run folder, cross-validation, resume rules and the command's errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge.cli import main

from conftest import synthetic_xray

pytest.importorskip("tensorflow")

from capsedge.train.config import TrainConfig  # noqa: E402
from capsedge.train.cross_validation import cross_validate  # noqa: E402
from capsedge.train.trainer import train  # noqa: E402

FAST = TrainConfig(model="effcaps_mnist", epochs=1, batch_size=4, holdout=0.25)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two makers, eight generated pictures each, in the public flat layout."""
    folder = tmp_path_factory.mktemp("data")
    for i in range(8):
        Image.fromarray(synthetic_xray(seed=i)).save(folder / f"Depuy.{i}.jpg")
        Image.fromarray(np.rot90(synthetic_xray(seed=100 + i))).save(folder / f"Zimmer.{i}.png")
    return folder


@pytest.mark.slow
def test_train_writes_a_complete_run(tiny_data: Path, tmp_path: Path) -> None:
    result = train(tiny_data, tmp_path / "run", FAST, progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "history.csv", "classifier.keras"):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists()  # removed once the run completed
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["Depuy", "Zimmer"] and config["preprocessing"]["input_size"] == 28
    assert config["data"]["attribution"] == "trained on user-supplied images (provenance not given)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 12 and metrics["holdout"]["per_class"]["Zimmer"]["support"] == 2
    assert result.classifier.output_shape == (None, 2)
    assert_pictures(run)
    check_capsule_grid(run, tiny_data, tmp_path)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_data, tmp_path / "fresh", FAST, resume=True, progress=False)
    (run / "backup").mkdir()
    with pytest.raises(ValueError, match="interrupted run"):
        train(tiny_data, run, FAST, progress=False)


@pytest.mark.slow
def test_a_backup_cut_off_in_its_first_epoch_starts_the_run_again(tiny_data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # As a process that ran out of memory while writing its first backup leaves it: weights begun,
    # no epoch written, no previous backup. Resuming it once asked the user to delete the folder.
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    train(tiny_data, run, FAST, resume=True, progress=False)
    assert "cut off while its first epoch was written" in capsys.readouterr().err
    assert [row.split(",")[0] for row in (run / "history.csv").read_text().splitlines()[1:]] == ["0"]
    assert (run / "metrics.json").is_file() and not (run / "backup").exists()


def colours_in(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        return {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def assert_pictures(run: Path) -> None:
    """The run's pictures are drawn: curves in the train and validation colours, bars, matrix."""
    from capsedge.train.figures import SECOND_COLOUR, TRAIN_COLOUR, VALIDATION_COLOUR

    curves = colours_in(run / "learning_curves.png")
    assert TRAIN_COLOUR in curves and VALIDATION_COLOUR in curves
    assert {TRAIN_COLOUR, SECOND_COLOUR} <= colours_in(run / "per_class.png")
    assert TRAIN_COLOUR in colours_in(run / "reliability.png")
    assert len(colours_in(run / "confusion.png")) > 3


def check_capsule_grid(run: Path, data: Path, tmp_path: Path) -> None:
    """``capsedge capsules`` on the run: one row of reconstructions per capsule dimension."""
    from click.testing import CliRunner

    from capsedge.cli import main
    from capsedge.train.capsule_view import DELTAS, HEAD_H, TILE

    out = tmp_path / "grid.png"
    image = str(data / "Depuy.0.jpg")
    result = CliRunner().invoke(main, ["capsules", image, "--run", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        pixels = np.asarray(grid)
    dims = (pixels.shape[0] - HEAD_H - 4) // (TILE + 2)
    assert dims == 16  # effcaps_mnist's class capsules have 16 dimensions
    assert pixels.shape[1] == 44 + len(DELTAS) * (TILE + 2)
    row = pixels[HEAD_H: HEAD_H + TILE]
    first, last = row[:, 44:44 + TILE], row[:, 44 + 10 * (TILE + 2): 44 + 10 * (TILE + 2) + TILE]
    assert not np.array_equal(first, last)  # shifting a dimension changes the reconstruction
    missing = CliRunner().invoke(main, ["capsules", str(data / "Depuy.0.jpg"), "--run", str(tmp_path),
                                        "--out", str(out)])
    assert missing.exit_code == 1 and missing.stderr.startswith("capsedge: error:")


@pytest.mark.slow
def test_cross_validation_summary_and_skips_finished_folds(tiny_data: Path, tmp_path: Path) -> None:
    summary = cross_validate(tiny_data, tmp_path / "cv", FAST, folds=2, progress=False)
    assert summary["folds"] == 2 and len(summary["per_fold"]) == 2
    assert 0.0 <= summary["accuracy_mean"] <= 1.0
    assert sum(map(sum, summary["pooled"]["confusion_matrix"])) == 16  # every image validated once
    assert_pictures_of_cross_validation(tmp_path / "cv")
    written = (tmp_path / "cv" / "fold-0" / "classifier.keras").stat().st_mtime_ns
    again = cross_validate(tiny_data, tmp_path / "cv", FAST, folds=2, resume=True, progress=False)
    assert again["per_fold"] == summary["per_fold"]
    assert (tmp_path / "cv" / "fold-0" / "classifier.keras").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="already holds a cross-validation"):
        cross_validate(tiny_data, tmp_path / "cv", FAST, folds=2, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        cross_validate(tiny_data, tmp_path / "cv", FAST, folds=3, resume=True, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        cross_validate(tiny_data, tmp_path / "cv", replace(FAST, schedule="one-cycle"), folds=2, resume=True,
                       progress=False)
    # A run written before a setting existed resumes: it trained with that setting's default.
    settings = tmp_path / "cv" / "cv_settings.json"
    older = json.loads(settings.read_text())
    del older["train"]["schedule"]
    settings.write_text(json.dumps(older))
    resumed = cross_validate(tiny_data, tmp_path / "cv", FAST, folds=2, resume=True, progress=False)
    assert resumed["per_fold"] == summary["per_fold"]


def assert_pictures_of_cross_validation(folder: Path) -> None:
    from capsedge.train.figures import TRAIN_COLOUR

    assert len(colours_in(folder / "confusion.png")) > 3
    assert TRAIN_COLOUR in colours_in(folder / "reliability.png")
    assert TRAIN_COLOUR in colours_in(folder / "per_class.png")


def test_train_command_refuses_unusable_data(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "capsedge: error: no images found" in result.stderr
    Image.fromarray(synthetic_xray()).save(tmp_path / "Depuy.1.jpg")
    result = runner.invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "at least two classes" in result.stderr
    result = runner.invoke(main, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "data not found" in result.stderr
    Image.fromarray(synthetic_xray(seed=1)).save(tmp_path / "Zimmer.1.jpg")
    run = tmp_path.with_name(tmp_path.name + "-run")  # a run may not lie inside its data folder
    args = ["train", "--data", str(tmp_path), "--out", str(run), "--model", "efcaps"]
    bad = runner.invoke(main, args)
    assert bad.exit_code == 1 and "did you mean" in bad.stderr


@pytest.mark.slow
def test_train_command_records_every_option_in_the_run(tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from capsedge import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)  # show even this quick work
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--model", "effcaps_mnist",
            "--epochs", "1", "--batch-size", "4", "--lr", "0.002", "--beta", "0.9", "--holdout", "0.25",
            "--reconstruction-weight", "0", "--ncp-weight", "0.3", "--augment", "none", "--seed", "3",
            "--mixup", "0.2", "--ema", "0.9", "--weight-decay", "0.01", "--warmup", "0.2",
            "--schedule", "one-cycle", "--label-smoothing", "0.05", "--init", "none", "--freeze-stages", "0",
            "--attribution", "uci-517"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.stdout
    assert "reading images: 16/16" in result.stderr  # a plain line: stderr is no terminal here
    data = json.loads((tmp_path / "r" / "config.json").read_text())["data"]
    assert "UCI Machine Learning Repository" in data["attribution"]
    assert data["source"] == str(tiny_data.resolve())
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert recorded == {"model": "effcaps_mnist", "epochs": 1, "batch_size": 4, "learning_rate": 0.002,
                        "beta": 0.9, "reconstruction_weight": 0.0, "ncp_weight": 0.3, "holdout": 0.25,
                        "augment": "none", "seed": 3, "mixup": 0.2, "ema": 0.9, "weight_decay": 0.01,
                        "warmup": 0.2, "schedule": "one-cycle", "label_smoothing": 0.05, "init": "none",
                        # --int8-trunk needs a frozen trunk: tests/test_pretrained.py
                        "freeze_stages": 0, "int8_trunk": 0.0, "training_views": 8, "int8_aware_trunk": 0,
                        # with --init run:PATH: test_pretrained
                        "stage1_readout": 0.0, "readout_run": "", "readout_loss": 0.0,
                        "distill_readout": 0.0}
    bad = CliRunner().invoke(main, [*args[:5], "--reconstruction-weight", "-1"])
    assert bad.exit_code == 2 and "-1" in bad.stderr


def test_train_command_refuses_an_int8_trunk_without_a_frozen_trunk(tiny_data: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--int8-trunk", "0.5",
            "--freeze-stages", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "capsedge: error: int8_trunk needs a frozen trunk (--freeze-stages > 0), the dihedral augmentation "
        "and no mixup"]
    assert not (tmp_path / "r").exists()


def test_train_command_refuses_a_readout_without_its_stage_one_run(tiny_data: Path, tmp_path: Path) -> None:
    base = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r")]
    for extra, message in (
            (["--stage1-readout", "0.5"],
             "stage1_readout needs init run:PATH, the stage-1 run whose linear head it copies"),
            (["--reuse", str(tmp_path)], "--reuse adds the stage-1 read-out to a trained run: give "
                                         "--stage1-readout too")):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [f"capsedge: error: {message}"]
    assert not (tmp_path / "r").exists()


MIRRORED = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from capsedge.train.config import TrainConfig
from capsedge.train.trainer import train
config = TrainConfig(model="effcaps_mnist", epochs=1, batch_size=4, holdout=0.25)
result = train(sys.argv[1], sys.argv[2], config, devices=["/cpu:0", "/cpu:1"], progress=False)
print(json.dumps(result.metrics["devices"]))
"""


@pytest.mark.slow
def test_training_is_data_parallel_over_several_devices(tiny_data: Path, tmp_path: Path) -> None:
    """MirroredStrategy, as on a multi-GPU machine, here over two logical CPU devices (a fresh
    process: TensorFlow's devices are fixed once it starts)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MIRRORED, str(tiny_data), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["devices"] == 2
    assert (tmp_path / "run" / "classifier.keras").is_file()


@pytest.mark.parametrize(("settings", "mode"), [
    ({}, "frozen-trunk"),  # the bundled recipe: five frozen stages, the eight dihedral views
    ({"freeze_stages": 0}, "end-to-end"),  # nothing frozen
    ({"augment": "d4"}, "end-to-end"),  # views the trunk cannot precompute
    ({"mixup": 0.2}, "end-to-end"),
    ({"freeze_stages": 7, "init": "none"}, "frozen-trunk"),
    ({"int8_trunk": 0.5}, "frozen-trunk"),
    ({"training_views": 16}, "frozen-trunk"),
    ({"int8_aware_trunk": 2}, "frozen-trunk"),
])
def test_the_plan_trains_above_frozen_maps_only_when_the_trunk_can_precompute_them(
    settings: dict, mode: str
) -> None:
    from capsedge.models import get_model_config
    from capsedge.train.plan import END_TO_END, FROZEN_TRUNK, TrainingPlan

    config = TrainConfig(model="effcaps_ncp_lite0_224", **settings)
    plan = TrainingPlan.build(config, get_model_config(config.model), ("Depuy", "Zimmer"))
    assert plan.mode == mode and plan.frozen_trunk == (mode == FROZEN_TRUNK)
    assert plan.model.class_names == ("Depuy", "Zimmer") and plan.model.num_classes == 2
    assert plan.preprocessing.input_size == 224
    # Distilled on each part's own images, the trunk differs from part to part.
    assert plan.parts_share_frozen_maps == (mode == FROZEN_TRUNK and config.init == "imagenet"
                                            and not config.int8_aware_trunk)
    # A network without a pretrained trunk always trains end to end, and cannot have an int8 one.
    plain = TrainingPlan.build(replace(config, model="effcaps_mnist", int8_trunk=0.0, training_views=8,
                                       int8_aware_trunk=0),
                               get_model_config("effcaps_mnist"), ("Depuy", "Zimmer"))
    assert plain.mode == END_TO_END and not plain.parts_share_frozen_maps
    for name, flag in (("int8_trunk", "--int8-trunk"), ("training_views", "--training-views 16"),
                       ("int8_aware_trunk", "--int8-aware-trunk")):
        if name in settings:
            with pytest.raises(ValueError, match=f"{flag} needs a model with a pretrained trunk"):
                TrainingPlan.build(replace(config, model="effcaps_mnist"), get_model_config("effcaps_mnist"),
                                   ("Depuy", "Zimmer"))


def test_the_plan_starts_each_part_from_the_same_part_of_a_stage_one_run(tmp_path: Path) -> None:
    from capsedge.models import get_model_config
    from capsedge.train.plan import TrainingPlan

    def plan(init: str) -> TrainingPlan:
        config = TrainConfig(model="lite0_linear_224", init=init)
        return TrainingPlan.build(config, get_model_config(config.model), ("Depuy", "Zimmer"))

    assert plan("imagenet").stage1_run is None and plan("imagenet").stage1_trunk(0) is None
    stage1 = tmp_path / "s1"
    staged = plan(f"run:{stage1}")
    assert staged.stage1_run == stage1 and not staged.parts_share_frozen_maps
    with pytest.raises(ValueError, match="no stage-1 trunk"):
        staged.stage1_trunk()
    for part, held in (("fold-0", [0, 2]), ("final", [])):
        (stage1 / part).mkdir(parents=True)
        (stage1 / part / "trunk.npz").write_bytes(b"")
        np.save(stage1 / part / "holdout_indices.npy", np.array(held))
    assert staged.stage1_trunk() == stage1 / "final" / "trunk.npz"  # a single run: the final trunk
    assert staged.stage1_trunk(0, np.array([2, 0])) == stage1 / "fold-0" / "trunk.npz"
    assert staged.stage1_trunk("final", np.array([], dtype=int)) == stage1 / "final" / "trunk.npz"
    with pytest.raises(ValueError, match="did not hold out fold 0's images"):
        staged.stage1_trunk(0, np.array([0, 1]))


def test_every_train_setting_is_an_option_of_the_command_with_its_default() -> None:
    from capsedge.train.cli import command
    from capsedge.train.config import options

    params = {param.name: param for param in command.params}
    for name, option, default in options():
        param = params[name]
        assert param.default == default == getattr(TrainConfig(), name) and param.help == option.help
        assert (option.flag or f"--{name.replace('_', '-')}") in param.opts
    assert params["learning_rate"].opts == ["--lr"]


def test_the_final_run_is_named_only_once_it_is_trained(tmp_path: Path) -> None:
    """``--final --fold 4`` can finish the folds' summary before the final part trains: the command
    then says the final run is still to train, not that it was written."""
    from capsedge.train.cli import final_run_line
    from capsedge.workshop.run import CrossValidation

    cv = CrossValidation(tmp_path / "cv")
    assert final_run_line(cv).startswith("the final run is not trained yet: --fold final")
    cv.final.path.mkdir(parents=True)
    cv.final.write_metrics({"holdout": None})
    cv.final.backup.mkdir()  # interrupted: a backup is left
    assert "not trained yet" in final_run_line(cv)
    cv.final.backup.rmdir()
    assert final_run_line(cv) == f"final run in {cv.final.path}"
