"""Training augmentation and batches: shapes, ranges, what each kind does, repeatability."""

from __future__ import annotations

import numpy as np
import pytest

from capsedge.train.augment import AUGMENTATIONS, Augmentation, augment_batch, augment_image, get_augmentation


def _marked(size: int = 32) -> np.ndarray:
    """A black image with one bright block off the centre, so every orientation differs."""
    image = np.zeros((size, size, 1), np.float32)
    image[3:9, 5:20] = 1.0
    image[3:6, 5:8] = 0.5
    return image


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_keeps_shape_dtype_and_range(name: str) -> None:
    batch = np.random.default_rng(0).random((5, 32, 32, 1), dtype=np.float32)
    out = augment_batch(batch, get_augmentation(name), np.random.default_rng(1))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out is not batch


def test_no_augmentation_is_an_unchanged_copy() -> None:
    batch = _marked()[None]
    out = augment_batch(batch, None, np.random.default_rng(0))
    np.testing.assert_array_equal(out, batch)
    out[0, 0, 0, 0] = 7.0
    assert batch[0, 0, 0, 0] == 0.0


def test_dihedral_alone_gives_exactly_the_eight_orientations() -> None:
    image = _marked()
    rng = np.random.default_rng(0)
    seen = {augment_image(image, Augmentation(), rng).tobytes() for _ in range(200)}
    grey = image[..., 0]
    expected = {np.ascontiguousarray(np.rot90(g, k)[..., None]).tobytes()
                for g in (grey, grey[:, ::-1]) for k in range(4)}
    assert seen == expected


def test_a_seed_draws_the_orientations_it_drew_before_the_views_were_renumbered() -> None:
    """Training draws a flip, then quarter turns, as it always did: the runtime's numbering of the
    views (capsedge.views) changed no run's augmentation."""
    image = _marked()
    for seed in range(20):
        drawn = augment_image(image, Augmentation(), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        grey = image[..., 0][:, ::-1] if rng.random() < 0.5 else image[..., 0]
        np.testing.assert_array_equal(drawn[..., 0], np.rot90(grey, int(rng.integers(4))))


def test_affine_moves_the_content_and_fills_black() -> None:
    image = np.zeros((64, 64, 1), np.float32)
    image[28:36, 28:36] = 1.0  # a centred square
    spec = Augmentation(dihedral=False, shift=0.2)
    moved = [augment_image(image, spec, np.random.default_rng(s)) for s in range(5)]
    centres = [np.argwhere(m[..., 0] > 0.5).mean(0) for m in moved]
    assert max(np.abs(c - 31.5).max() for c in centres) > 3  # shifted by several pixels
    assert all(m[0, 0, 0] == 0.0 for m in moved)  # what came from outside is black
    zoomed = augment_image(image, Augmentation(dihedral=False, zoom=0.5), np.random.default_rng(3))
    assert (zoomed > 0.5).sum() != (image > 0.5).sum()


def test_contrast_and_brightness_change_grey_levels_only() -> None:
    image = np.linspace(0.1, 0.9, 32 * 32, dtype=np.float32).reshape(32, 32, 1)
    out = augment_image(image, Augmentation(dihedral=False, contrast=0.3, brightness=0.1),
                        np.random.default_rng(2))
    assert not np.allclose(out, image)
    assert np.all(np.diff(out.ravel()) >= 0)  # the order of grey levels is kept


def test_same_generator_state_gives_the_same_views() -> None:
    batch = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
    spec = get_augmentation("full")
    a = augment_batch(batch, spec, np.random.default_rng([3, 7]))
    b = augment_batch(batch, spec, np.random.default_rng([3, 7]))
    np.testing.assert_array_equal(a, b)


def test_unknown_augmentation_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="d4-strong"):
        get_augmentation("rotate")


def test_training_batches_are_repeatable_per_epoch_and_cover_every_image() -> None:
    pytest.importorskip("keras")
    from capsedge.train.batches import TrainingBatches

    images = np.stack([np.full((16, 16, 1), i / 10, np.float32) for i in range(10)])
    onehot = np.eye(2, dtype=np.float32)[np.arange(10) % 2]
    batches = TrainingBatches(images, onehot, {"caps_length", "reconstruction"}, 4, None, seed=5)
    assert len(batches) == 3

    def epoch(e: int) -> list[float]:
        batches.epoch = e
        seen = []
        for i in range(len(batches)):
            (x, y), targets = batches[i]
            assert set(targets) == {"caps_length", "reconstruction"}
            np.testing.assert_array_equal(targets["reconstruction"], x)
            np.testing.assert_array_equal(targets["caps_length"], y)
            seen += [round(float(v), 3) for v in x[:, 0, 0, 0]]
        return seen

    first = epoch(0)
    assert sorted(first) == [i / 10 for i in range(10)]  # each image once
    assert epoch(0) == first  # the same epoch again: the same order
    assert epoch(1) != first  # the next epoch: reshuffled


def test_mixup_mixes_images_and_labels_with_one_weight() -> None:
    pytest.importorskip("keras")
    from capsedge.train.batches import TrainingBatches

    images = np.stack([np.full((8, 8, 1), float(i % 2), np.float32) for i in range(8)])
    onehot = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    (x, y), targets = TrainingBatches(images, onehot, {"caps_length"}, 8, None, seed=1, mixup=0.4)[0]
    assert not np.all(np.isin(x, (0.0, 1.0)))  # some pairs of different classes were mixed
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x[:, 0, 0, 0], y[:, 1], rtol=1e-6)  # image brightness = share of class 1
    np.testing.assert_array_equal(targets["caps_length"], y)
    with pytest.raises(ValueError, match="mixup"):
        TrainingBatches(images, onehot, set(), 8, None, seed=1, mixup=-1)
