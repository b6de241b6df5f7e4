"""Tests of capsedge.models: registry, layers against NumPy references, losses, saving."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from capsedge.models import (  # noqa: E402
    BuiltModel,
    ModelConfig,
    build_model,
    get_model_config,
    list_model_configs,
    losses,
    perturb_capsule,
    rebuild_classifier,
)
from capsedge.models import layers as L  # noqa: E402
from capsedge.models.heads import ProbabilityFusion, UnrolledCfC  # noqa: E402
from capsedge.train.batches import average_pool  # noqa: E402

from conftest import classifier_with_ncps_cfc, ncps_cfc  # noqa: E402

NAMES = list_model_configs()
# Every configuration is checked as data; the networks are built for the from-scratch ones and
# for the smallest member of each ImageNet-pretrained family (the sizes differ only in input).
BUILT_NAMES = [n for n in NAMES if get_model_config(n).trunk is None or n.endswith("_224")]
RNG = np.random.default_rng(0)


@functools.cache
def built(name: str) -> BuiltModel:
    """One untrained build per config, shared by the read-only tests."""
    keras.utils.set_random_seed(1)
    return build_model(get_model_config(name))


def images(cfg: ModelConfig, n: int = 2) -> np.ndarray:
    return np.random.default_rng(2).random((n, *cfg.input_shape), dtype=np.float32)


def onehot(cfg: ModelConfig, n: int = 2) -> np.ndarray:
    return np.eye(cfg.num_classes, dtype="float32")[np.arange(n) % cfg.num_classes]


# --- NumPy references, written from the papers' equations ---------------------------------


def squash_ref(s: np.ndarray, kind: str = "efficient") -> np.ndarray:
    n = np.linalg.norm(s, axis=-1, keepdims=True)
    scale = 1 - np.exp(-n) if kind == "efficient" else n**2 / (1 + n**2)
    return scale * s / n


def predictions_ref(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u_hat[b, j, i] = u[b, i] @ W[j, i]: (B, N_out, N_in, D_out)."""
    return np.matmul(u[:, None, :, None, :], w[None])[..., 0, :]


def softmax_ref(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def self_attention_ref(u: np.ndarray, w: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """Mazzia et al. 2021, eqs. 2-4, with the full N_in x N_in agreement matrix."""
    u_hat = predictions_ref(u, w).astype(np.float64)
    out = np.zeros((u.shape[0], w.shape[0], w.shape[-1]))
    for n in range(u.shape[0]):
        logits = np.stack([(u_hat[n, j] @ u_hat[n, j].T).sum(-1) for j in range(w.shape[0])])
        c = softmax_ref(logits / np.sqrt(d), axis=0)  # over output capsules
        out[n] = ((c[..., None] + b) * u_hat[n]).sum(1)
    return squash_ref(out)


def dynamic_routing_ref(u: np.ndarray, w: np.ndarray, iterations: int) -> np.ndarray:
    """Sabour et al. 2017, Procedure 1."""
    u_hat = predictions_ref(u, w).astype(np.float64)
    logits = np.zeros(u_hat.shape[:3])
    for r in range(iterations):
        c = softmax_ref(logits, axis=1)
        v = squash_ref((c[..., None] * u_hat).sum(2), "hinton")
        if r < iterations - 1:
            logits = logits + np.einsum("bjiz,bjz->bji", u_hat, v)
    return v


# --- registry and configuration -----------------------------------------------------------


def test_registry_names():
    assert {"effcaps_mnist", "effcaps_implant_128", "effcaps_ncp_implant_128"} <= set(NAMES)
    assert {"capsnet_mnist", "capsnet_implant_128"} <= set(NAMES)
    for name in NAMES:
        assert get_model_config(name).name == name


def test_unknown_name_lists_names_and_closest_match():
    with pytest.raises(ValueError, match="did you mean 'effcaps_ncp_implant_128'") as info:
        get_model_config("effcaps_ncp_implant")
    assert "effcaps_mnist" in str(info.value)


def test_config_is_frozen_and_replaceable():
    cfg = get_model_config("effcaps_ncp_implant_128")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.use_ncp = False  # type: ignore[misc]
    assert dataclasses.replace(cfg, use_ncp=False).use_ncp is False
    assert cfg.use_ncp is True
    assert cfg.class_names == ("Cofield", "Depuy", "Tornier", "Zimmer")


def test_norm_order_places_batch_norm_before_or_after_relu():
    cfg = get_model_config("effcaps_implant_128")
    paper = build_model(cfg).classifier
    assert paper.get_layer("conv1").activation.__name__ == "relu"
    folded = build_model(dataclasses.replace(cfg, norm_order="bn_relu")).classifier
    assert folded.get_layer("conv1").activation.__name__ == "linear"
    names = [layer.name for layer in folded.layers]
    assert names.index("conv1") < names.index("bn1") < names.index("relu1") < names.index("conv2")
    assert n_trainable(folded) == n_trainable(paper)


@pytest.mark.parametrize("name", NAMES)
def test_config_dict_round_trip(name):
    cfg = get_model_config(name)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="'depth'"):
        ModelConfig.from_dict({**data, "depth": 3})


def test_config_carries_its_preprocessing_and_labels():
    from capsedge.classifier import default_model_path
    from capsedge.metadata import read_metadata
    from capsedge.models.registry import IMPLANT_CLASSES

    shipped = read_metadata(default_model_path())
    cfg = get_model_config(shipped.name)
    assert cfg.preprocessing == shipped.preprocessing and cfg.preprocessing.input_size == 512
    assert cfg.labels == shipped.labels == IMPLANT_CLASSES
    assert get_model_config("effcaps_mnist").labels == tuple("0123456789")
    assert "preprocessing" not in cfg.to_dict() and "labels" not in cfg.to_dict()  # config.json unchanged
    with pytest.raises(ValueError, match="square"):
        _ = dataclasses.replace(cfg, input_shape=(512, 256, 1), primary_kernel=8).preprocessing


@pytest.mark.parametrize(
    "change, text",
    [
        ({"routing": "em"}, "'em'"),
        ({"fusion_weight": 1.5}, "1.5"),
        ({"decoder": "big"}, "'big'"),
        ({"num_classes": 1}, "1"),
        ({"norm_order": "bn_relu_bn"}, "'bn_relu_bn'"),
    ],
)
def test_bad_config_values_are_reported(change, text):
    with pytest.raises(ValueError, match=text):
        dataclasses.replace(get_model_config("effcaps_implant_128"), **change)


# --- parameter counts ----------------------------------------------------------------------


def n_trainable(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def test_effcaps_mnist_parameter_count_matches_paper():
    model = built("effcaps_mnist")
    assert n_trainable(model.classifier) == 161_824
    assert model.classifier.count_params() == 162_400
    assert model.decoder.count_params() == 1_411_344


def test_capsnet_mnist_parameter_count_matches_paper():
    assert built("capsnet_mnist").classifier.count_params() == 6_804_224


def test_implant_models_are_small():
    for name in ("effcaps_implant_128", "effcaps_ncp_implant_128"):
        model = built(name)
        assert model.classifier.count_params() < 300_000
        assert model.decoder.count_params() <= 570_000


# --- built models --------------------------------------------------------------------------


def trainer_outputs(cfg: ModelConfig) -> set[str]:
    if cfg.head == "linear":
        return {"linear_probs"}
    return {"caps_length", "reconstruction"} | ({"ncp_probs"} if cfg.use_ncp else set())


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_shapes_and_probabilities(name):
    model = built(name)
    cfg = model.config
    x, y = images(cfg), onehot(cfg)
    probs = model.classifier(x).numpy()
    assert probs.shape == (2, cfg.num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(probs >= 0)
    out = model.trainer([x, y])
    assert set(out) == trainer_outputs(cfg)
    if cfg.head == "linear":
        assert model.encoder is None
        return
    assert out["caps_length"].shape == (2, cfg.num_classes)
    side = cfg.reconstruction_size or cfg.input_shape[0]
    assert out["reconstruction"].shape == (2, side, side, cfg.input_shape[2])
    assert model.encoder(x).shape == (2, cfg.num_classes, cfg.class_dim)


def smoothed(lengths: np.ndarray, c: float = 0.0125) -> np.ndarray:
    """NormalizeLengths' formula: (|v_k| + c) / (sum_j |v_j| + K c)."""
    return (lengths + c) / (lengths.sum(1, keepdims=True) + c * lengths.shape[1])


def test_normalize_lengths_keeps_order_and_sums_to_one():
    from capsedge.models.layers import NormalizeLengths

    lengths = np.array([[0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.05, 0.2]], np.float32)
    out = NormalizeLengths()(lengths).numpy()
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out[0], 0.25, atol=1e-6)  # no evidence: uniform, no division by zero
    assert list(np.argsort(out[1])) == list(np.argsort(lengths[1]))
    np.testing.assert_allclose(out, smoothed(lengths), atol=1e-6)


def test_classifier_is_fusion_of_the_two_heads():
    model = built("effcaps_ncp_implant_128")
    cfg = model.config
    x = images(cfg)
    out = model.trainer([x, onehot(cfg)])
    lengths = out["caps_length"].numpy()
    expected = (
        cfg.fusion_weight * smoothed(lengths)
        + (1 - cfg.fusion_weight) * out["ncp_probs"].numpy()
    )
    np.testing.assert_allclose(model.classifier(x).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out["ncp_probs"].numpy().sum(1), 1.0, atol=1e-5)


def test_heads_switch_off():
    cfg = dataclasses.replace(get_model_config("effcaps_ncp_implant_128"), use_ncp=False, decoder=None)
    model = build_model(cfg)
    x = images(cfg)
    out = model.trainer([x, onehot(cfg)])
    assert set(out) == {"caps_length"}
    assert model.decoder is None
    lengths = out["caps_length"].numpy()
    np.testing.assert_allclose(
        model.classifier(x).numpy(), smoothed(lengths), atol=1e-6
    )


def test_reconstruction_is_decoded_from_the_true_label_capsule():
    model = built("effcaps_implant_128")
    cfg = model.config
    x, y = images(cfg), onehot(cfg)
    caps = model.encoder(x).numpy()
    masked = (caps * y[..., None]).reshape(2, -1)
    np.testing.assert_allclose(
        model.trainer([x, y])["reconstruction"].numpy(), model.decoder(masked).numpy(), atol=1e-5
    )


def graph_op_types(model: keras.Model, shape: tuple) -> set[str]:
    fn = tf.function(lambda x: model(x, training=False))
    graph_def = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_classifier_graph_has_no_loops(name):
    model = built(name)
    types = graph_op_types(model.classifier, (1, *model.config.input_shape))
    assert "Conv2D" in types  # the trace really holds the network
    assert not types & {"While", "StatelessWhile"}


def small_for_training(cfg: ModelConfig) -> ModelConfig:
    """``cfg``, with a pretrained trunk cut to its first two stages on 32x32 images: the same
    trunk, head, decoder and losses wired together, in a graph that traces in seconds."""
    if cfg.trunk is None:
        return cfg
    return dataclasses.replace(
        cfg, input_shape=(32, 32, 1), trunk_stages=2, primary_kernel=8,  # an 8x8 map at stride 4
        reconstruction_size=16 if cfg.reconstruction_size else None,
    )


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_one_train_step(name):
    keras.utils.set_random_seed(3)
    cfg = small_for_training(get_model_config(name))
    model = build_model(cfg)
    weights = np.linspace(0.5, 1.5, cfg.num_classes)
    x, y = images(cfg, 4), onehot(cfg, 4)
    target = average_pool(x, cfg.reconstruction_size)  # what the trainer's batches reconstruct
    loss = {
        "caps_length": losses.MarginLoss(class_weights=weights),
        "reconstruction": losses.ReconstructionLoss(),
        "ncp_probs": losses.WeightedCrossEntropy(class_weights=weights, gamma=2.0),
        "linear_probs": losses.WeightedCrossEntropy(class_weights=weights),
    }
    targets = {"caps_length": y, "ncp_probs": y, "linear_probs": y, "reconstruction": target}
    outputs = trainer_outputs(cfg)
    model.trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss={k: loss[k] for k in outputs})
    before = [w.numpy().copy() for w in model.classifier.trainable_weights]
    history = model.trainer.fit(
        [x, y],
        {k: targets[k] for k in outputs},
        batch_size=4,
        epochs=1,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"][0])
    after = model.classifier.trainable_weights
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, after, strict=True))


# --- layers against NumPy ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["efficient", "hinton"])
def test_squash_matches_numpy(kind):
    s = RNG.normal(size=(4, 10, 16)).astype("float32") * RNG.uniform(0.1, 5, size=(4, 10, 1))
    v = L.Squash(kind)(s).numpy()
    np.testing.assert_allclose(v, squash_ref(s, kind), atol=1e-5)
    assert np.all(np.linalg.norm(v, axis=-1) <= 1 + 1e-6)


def test_squash_in_edge_tpu_ops_equals_the_papers_formula_near_zero_and_far():
    norms = np.array([1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0, 30.0], dtype="float32")
    s = norms[:, None] * np.eye(1, 8, dtype="float32")  # vectors of exactly these lengths
    lengths = np.linalg.norm(L.Squash()(s[None]).numpy()[0], axis=-1)
    np.testing.assert_allclose(lengths, 1 - np.exp(-norms), rtol=2e-4, atol=1e-6)


def test_squash_is_finite_at_zero():
    x = tf.zeros((1, 3, 8))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = L.Squash()(x)
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(tape.gradient(y, x).numpy()))


@pytest.mark.parametrize("scale, d", [("d_out", 16), ("d_in", 8)])
def test_self_attention_routing_matches_numpy(scale, d):
    u = squash_ref(RNG.normal(size=(3, 16, 8))).astype("float32")
    layer = L.FCCaps(4, 16, scale=scale)
    layer.build(u.shape)
    w = RNG.normal(scale=0.5, size=(4, 16, 8, 16)).astype("float32")
    b = RNG.normal(scale=0.1, size=(4, 16, 1)).astype("float32")
    layer.set_weights([w, b])
    np.testing.assert_allclose(layer(u).numpy(), self_attention_ref(u, w, b, d), atol=1e-5)


def test_dynamic_routing_matches_numpy():
    u = squash_ref(RNG.normal(size=(3, 36, 8)), "hinton").astype("float32")
    layer = L.DigitCaps(5, 16, iterations=3)
    layer.build(u.shape)
    w = RNG.normal(scale=0.3, size=(5, 36, 8, 16)).astype("float32")
    layer.set_weights([w])
    np.testing.assert_allclose(layer(u).numpy(), dynamic_routing_ref(u, w, 3), atol=1e-5)


def test_primary_caps_matches_numpy():
    x = RNG.normal(size=(2, 5, 5, 12)).astype("float32")
    layer = L.PrimaryCaps(3, 4, 5)
    layer.build(x.shape)
    kernel = RNG.normal(size=(5, 5, 12, 1)).astype("float32")
    bias = RNG.normal(size=(12,)).astype("float32")
    layer.set_weights([kernel, bias])
    s = (x * kernel[..., 0]).sum(axis=(1, 2)) + bias
    np.testing.assert_allclose(layer(x).numpy(), squash_ref(s.reshape(2, 3, 4)), atol=1e-5)


def test_primary_conv_caps_shape():
    out = L.PrimaryConvCaps(32, 8, 9, 2)(np.zeros((1, 20, 20, 16), "float32"))
    assert out.shape == (1, 6 * 6 * 32, 8)


def test_length_and_mask():
    caps = RNG.normal(size=(2, 3, 4)).astype("float32")
    np.testing.assert_allclose(L.Length()(caps).numpy(), np.linalg.norm(caps, axis=-1), atol=1e-5)
    y = np.eye(3, dtype="float32")[[2, 0]]
    by_label = L.Mask()([caps, y]).numpy().reshape(2, 3, 4)
    np.testing.assert_array_equal(by_label, caps * y[..., None])
    longest = np.linalg.norm(caps, axis=-1).argmax(1)
    by_length = L.Mask()(caps).numpy().reshape(2, 3, 4)
    np.testing.assert_array_equal(by_length, caps * np.eye(3)[longest][..., None])


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: L.Squash("tanh"), "'tanh'"),
        (lambda: L.PrimaryCaps(0, 8, 9), "received 0"),
        (lambda: L.FCCaps(10, 16, scale="d"), "'d'"),
        (lambda: L.DigitCaps(10, 16, iterations=2.5), "2.5"),
        (lambda: ProbabilityFusion(2.0), "2.0"),
    ],
)
def test_layer_arguments_are_validated(make, text):
    with pytest.raises(ValueError, match=text):
        make()


def test_primary_caps_rejects_a_map_its_kernel_does_not_cover():
    with pytest.raises(ValueError, match="received a 10x10 map"):
        L.PrimaryCaps(16, 8, 9)(np.zeros((1, 10, 10, 128), "float32"))


# --- serialisation -------------------------------------------------------------------------

LAYER_CASES = [
    (lambda: L.Squash("hinton", epsilon=1e-6), (2, 4, 8)),
    (lambda: L.PrimaryCaps(4, 8, 3, squash="hinton"), (2, 3, 3, 32)),
    (lambda: L.PrimaryConvCaps(4, 8, 3, strides=2), (2, 9, 9, 6)),
    (lambda: L.FCCaps(3, 6, scale="d_in"), (2, 5, 4)),
    (lambda: L.DigitCaps(3, 6, iterations=2), (2, 5, 4)),
    (lambda: L.Length(epsilon=1e-6), (2, 4, 8)),
    (lambda: L.Mask(), (2, 4, 8)),
    (lambda: L.NormalizeLengths(), (2, 4)),
]


@pytest.mark.parametrize("make, shape", LAYER_CASES)
def test_layer_config_round_trip(make, shape):
    layer = make()
    x = RNG.random(shape).astype("float32")
    y = layer(x).numpy()
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), y, atol=1e-6)


@pytest.mark.parametrize("name", ["effcaps_ncp_implant_128", "capsnet_mnist"])
def test_keras_file_round_trip(name, tmp_path):
    model = built(name)
    cfg = model.config
    x, y = images(cfg), onehot(cfg)
    model.classifier.save(tmp_path / "classifier.keras")
    model.trainer.save(tmp_path / "trainer.keras")
    classifier = keras.models.load_model(tmp_path / "classifier.keras")
    trainer = keras.models.load_model(tmp_path / "trainer.keras")
    np.testing.assert_allclose(classifier(x).numpy(), model.classifier(x).numpy(), atol=1e-6)
    expected = model.trainer([x, y])
    for key, value in trainer([x, y]).items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), atol=1e-6)


def test_compiled_losses_round_trip():
    for loss in (
        losses.MarginLoss(m_plus=0.95, class_weights=[1.0, 2.0]),
        losses.WeightedCrossEntropy(class_weights=[1.0, 2.0], gamma=2.0),
        losses.ReconstructionLoss(),
    ):
        clone = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(clone) is type(loss) and clone.get_config() == loss.get_config()


# --- losses --------------------------------------------------------------------------------


def test_margin_loss_by_hand():
    y = np.array([[0, 1, 0], [1, 0, 0]], "float32")
    lengths = np.array([[0.2, 0.5, 0.05], [0.95, 0.3, 0.1]], "float32")
    # sample 0: present (0.9-0.5)^2 = 0.16; absent 0.5*((0.2-0.1)^2 + 0) = 0.005
    # sample 1: present 0; absent 0.5*((0.3-0.1)^2 + 0) = 0.02
    np.testing.assert_allclose(losses.margin_loss(y, lengths).numpy(), [0.165, 0.02], atol=1e-6)
    weighted = losses.margin_loss(y, lengths, class_weights=[2.0, 3.0, 1.0]).numpy()
    np.testing.assert_allclose(weighted, [0.165 * 3.0, 0.02 * 2.0], atol=1e-6)
    assert float(losses.MarginLoss()(y, lengths)) == pytest.approx(0.0925, abs=1e-6)


def test_weighted_and_focal_cross_entropy_by_hand():
    y = np.array([[0, 1], [1, 0]], "float32")
    p = np.array([[0.3, 0.7], [0.6, 0.4]], "float32")
    ce = losses.weighted_categorical_crossentropy(y, p, class_weights=[2.0, 0.5]).numpy()
    np.testing.assert_allclose(ce, [-0.5 * np.log(0.7), -2.0 * np.log(0.6)], atol=1e-6)
    focal = losses.weighted_categorical_crossentropy(y, p, gamma=2.0).numpy()
    np.testing.assert_allclose(focal, [-(0.3**2) * np.log(0.7), -(0.4**2) * np.log(0.6)], atol=1e-6)


def test_reconstruction_loss_is_per_sample_mse():
    a = np.zeros((2, 4, 4, 1), "float32")
    b = np.full((2, 4, 4, 1), 0.5, "float32")
    b[1] = 1.0
    np.testing.assert_allclose(losses.reconstruction_loss(a, b).numpy(), [0.25, 1.0], atol=1e-7)


def test_class_balanced_weights():
    counts = [500, 100, 20, 5]
    np.testing.assert_array_equal(losses.class_balanced_weights(counts, 0.0), np.ones(4))
    for beta in (0.99, 0.999, 0.9999):
        w = losses.class_balanced_weights(counts, beta)
        assert w.sum() == pytest.approx(4.0)
        assert np.all(np.diff(w) > 0)  # rarer class, larger weight
    inverse = 1.0 / np.asarray(counts)
    inverse = inverse * 4 / inverse.sum()
    np.testing.assert_allclose(losses.class_balanced_weights(counts, 1 - 1e-9), inverse, rtol=1e-5)
    with pytest.raises(ValueError, match="1.0"):
        losses.class_balanced_weights(counts, 1.0)
    with pytest.raises(ValueError, match="0"):
        losses.class_balanced_weights([3, 0], 0.9)


# --- perturbation view ---------------------------------------------------------------------


def test_perturb_capsule():
    model = built("effcaps_implant_128")
    cfg = model.config
    caps = model.encoder(images(cfg, 1)).numpy()[0]
    deltas = [-0.25, 0.0, 0.25]
    out = perturb_capsule(model.decoder, caps, label=2, dim=5, deltas=deltas)
    assert out.shape == (3, *cfg.input_shape)
    masked = np.zeros_like(caps)
    masked[2] = caps[2]
    np.testing.assert_allclose(out[1], model.decoder(masked.reshape(1, -1)).numpy()[0], atol=1e-5)
    assert not np.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="received 16"):
        perturb_capsule(model.decoder, caps, label=0, dim=16)


# --- the hand-unrolled NCP head and models saved with ncps' CfC layer --------------------------


def test_unrolled_cfc_equals_the_ncps_cfc_layer_with_the_same_weights():
    x = np.random.default_rng(3).normal(size=(5, 8, 8)).astype("float32")
    keras.utils.set_random_seed(4)
    reference = ncps_cfc(16, 4)
    expected = np.asarray(reference(x))
    layer = UnrolledCfC(16, 4)
    layer.build(x.shape)
    assert [tuple(w.shape) for w in layer.weights] == [tuple(w.shape) for w in reference.weights]
    rng = np.random.default_rng(6)  # random biases too (zeros before)
    layer.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32") for w in reference.weights])
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(reference(x)), atol=1e-5)
    assert not np.allclose(np.asarray(layer(x)), expected)  # the weights did matter


def test_a_model_saved_with_the_ncps_layer_is_rebuilt_with_the_same_outputs(monkeypatch, tmp_path):
    cfg = get_model_config("effcaps_ncp_implant_lite")
    keras.utils.set_random_seed(5)
    old = classifier_with_ncps_cfc(cfg, monkeypatch)
    old.save(tmp_path / "old.keras")
    old = keras.models.load_model(tmp_path / "old.keras", compile=False)
    assert "CfC" in {type(layer).__name__ for layer in old.layers}
    rebuilt = rebuild_classifier(old, cfg)
    assert "UnrolledCfC" in {type(layer).__name__ for layer in rebuilt.layers}
    x = images(cfg, 3)
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(old(x)), atol=1e-5)
    other = dataclasses.replace(cfg, ncp_units=20)
    with pytest.raises(ValueError):
        rebuild_classifier(old, other)
    # Every weight fits, but the fusion is another function: only the output check can tell.
    caps_only = dataclasses.replace(cfg, fusion_weight=1.0)
    with pytest.raises(ValueError, match="the rebuilt model's outputs differ from the saved model's by"):
        rebuild_classifier(old, caps_only)
    assert rebuild_classifier(old, caps_only, tolerance=1.0) is not None
