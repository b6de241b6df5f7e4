"""Test-time views: the orientations, the runtime's average, its metadata and the training side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capsedge.classifier import Classifier
from capsedge.errors import CapsedgeError, ModelError, UsageError
from capsedge.explain import occlusion_map
from capsedge.metadata import ModelMetadata
from capsedge.preprocess import Preprocessing
from capsedge.views import DIHEDRAL_VIEWS, TURN_DEGREES, orientations, turned, view

SIZE = 32


def test_orientations_are_the_eight_distinct_dihedral_views_in_a_fixed_order() -> None:
    image = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE, 1)
    views = orientations(image, 8)
    assert all(v.shape == image.shape and v.flags.c_contiguous for v in views)
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[0], image)
    assert np.array_equal(views[1], image[:, ::-1])
    assert np.array_equal(views[2], image[::-1])
    assert np.array_equal(views[3], np.rot90(image, 2))
    assert np.array_equal(views[4], image.transpose(1, 0, 2))
    assert np.array_equal(views[7], np.rot90(image, 2).transpose(1, 0, 2))
    # the quarter turns are among them
    turns = {np.rot90(image, k).tobytes() for k in range(4)}
    assert turns <= {v.tobytes() for v in views}
    # a batch gets the same views, image by image
    batch = np.stack([image, image + 1])
    for single, batched in zip(views, orientations(batch, 8), strict=True):
        assert np.array_equal(batched[0], single) and np.array_equal(batched[1], single + 1)
    assert [v.tobytes() for v in orientations(image, 4)] == [v.tobytes() for v in views[:4]]


def test_sixteen_views_add_the_eight_of_the_image_turned_45_degrees() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((SIZE, SIZE, 1), dtype=np.float32)
    sixteen = orientations(image, 16)
    assert len(sixteen) == 16 and all(v.shape == image.shape and v.flags.c_contiguous for v in sixteen)
    assert [v.tobytes() for v in sixteen[:8]] == [v.tobytes() for v in orientations(image, 8)]
    assert [v.tobytes() for v in sixteen[8:]] == [v.tobytes() for v in orientations(turned(image), 8)]
    assert TURN_DEGREES == 45.0 and len({v.tobytes() for v in sixteen}) == 16
    # a batch gets the same views, image by image
    batch = np.stack([image, image[::-1]])
    for single, batched in zip(sixteen, orientations(batch, 16), strict=True):
        assert np.array_equal(batched[0], single)
    with pytest.raises(ValueError, match="square"):
        orientations(np.zeros((4, 6, 1)), 16)


def test_turned_turns_anticlockwise_about_the_centre_and_fills_black() -> None:
    image = np.zeros((SIZE, SIZE, 1), np.float32)
    image[4:8, 12:20] = 1.0  # a bar near the top, centred left-right
    np.testing.assert_allclose(turned(image, 0.0), image, atol=1e-6)
    np.testing.assert_allclose(turned(image, 90.0), np.rot90(image), atol=1e-5)  # to the left edge
    white = turned(np.ones((SIZE, SIZE, 1), np.float32))
    assert white[0, 0, 0] == 0.0 and white[SIZE // 2, SIZE // 2, 0] == pytest.approx(1.0)  # corners black
    # turned by 45 degrees the bar's centre moves from (6, 16) towards the top-left corner
    rows, cols = np.nonzero(turned(image)[..., 0] > 0.5)
    assert rows.mean() == pytest.approx(16 - 10 * np.cos(np.pi / 4), abs=1.0)
    assert cols.mean() == pytest.approx(16 - 10 * np.sin(np.pi / 4), abs=1.0)
    # each channel of each image alone, and the same shape back
    two = np.concatenate([image, 1 - image], axis=-1)[np.newaxis].repeat(2, axis=0)
    moved = turned(two)
    assert moved.shape == two.shape and moved.dtype == np.float32
    np.testing.assert_array_equal(moved[1, ..., :1], turned(image))
    np.testing.assert_array_equal(moved[0, ..., 1:], turned(1 - image))
    assert turned(np.zeros((0, SIZE, SIZE, 1))).shape == (0, SIZE, SIZE, 1)
    with pytest.raises(ValueError, match="images"):
        turned(np.zeros((SIZE, SIZE)))


@pytest.mark.parametrize("count", [0, 2, 3, 9, 12, 17, True, 4.0])
def test_orientations_refuse_other_counts(count: object) -> None:
    with pytest.raises(ValueError, match="test-time views"):
        orientations(np.zeros((4, 4, 1)), count)  # type: ignore[arg-type]


def test_transposed_views_need_a_square() -> None:
    assert len(orientations(np.zeros((4, 6, 1)), 4)) == 4
    with pytest.raises(ValueError, match="square"):
        orientations(np.zeros((4, 6, 1)), 8)
    assert view(np.zeros((4, 6, 1)), 3).shape == (4, 6, 1)
    with pytest.raises(ValueError, match="square"):
        view(np.zeros((4, 6, 1)), 4)


def test_one_view_by_its_number_is_the_same_as_in_the_list() -> None:
    """Training picks views one at a time (a random one per image); they must be the runtime's."""
    batch = np.random.default_rng(0).random((3, 5, 5, 1), dtype=np.float32)
    every = orientations(batch, DIHEDRAL_VIEWS)
    for index in range(DIHEDRAL_VIEWS):
        one = view(batch, index)
        assert one.flags.c_contiguous and np.array_equal(one, every[index])
        assert np.array_equal(view(batch[1], index), every[index][1])
    for bad in (-1, 8, True, 1.0):
        with pytest.raises(ValueError, match="from 0 to 7"):
            view(batch, bad)  # type: ignore[arg-type]


class LeftBrightBackend:
    """A model that answers "a" with probability 0.2 + 0.6 x the left half's mean brightness."""

    name = "stub"
    input_shape = (1, SIZE, SIZE, 1)
    num_outputs = 2

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.seen.append(batch[0].copy())
        p = 0.2 + 0.6 * float(batch[0][:, : SIZE // 2].mean())
        return np.array([p, 1 - p], np.float32)


def left_bright_classifier(views: int) -> tuple[Classifier, LeftBrightBackend]:
    backend = LeftBrightBackend()
    metadata = ModelMetadata("stub", "stub-1", ("a", "b"), Preprocessing(input_size=SIZE),
                             test_time_views=views)
    return Classifier(backend, metadata, Path("stub.tflite")), backend


def test_the_classifier_averages_its_models_views() -> None:
    tensor = np.zeros((SIZE, SIZE, 1), np.float32)
    tensor[:, : SIZE // 2] = 1.0  # left half white: "a" at 0.8 as given, 0.2 when flipped left-right
    one, _ = left_bright_classifier(1)
    assert one.probabilities(tensor) == pytest.approx([0.8, 0.2])
    four, backend = left_bright_classifier(4)
    # views: as given 0.8, left-right flip 0.2, top-bottom flip 0.8, both 0.2
    assert four.probabilities(tensor) == pytest.approx([0.5, 0.5])
    assert len(backend.seen) == 4 and np.array_equal(backend.seen[1], tensor[:, ::-1])
    eight, backend = left_bright_classifier(8)
    # transposed: the white half is on top, so the left half is half white: 0.5 each
    assert eight.probabilities(tensor) == pytest.approx([0.5, 0.5])
    assert len(backend.seen) == 8
    sixteen, backend = left_bright_classifier(16)
    # the turned eight lose the corners (black), so their "a" is below the upright eight's 0.5
    turned_a = np.mean([0.2 + 0.6 * v[:, : SIZE // 2].mean() for v in orientations(turned(tensor), 8)])
    assert 0.4 < turned_a < 0.49
    assert sixteen.probabilities(tensor) == pytest.approx([(0.5 + turned_a) / 2, 1 - (0.5 + turned_a) / 2])
    assert len(backend.seen) == 16 and np.array_equal(backend.seen[8], turned(tensor))
    assert four.probabilities(tensor, views=1) == pytest.approx([0.8, 0.2])
    with pytest.raises(UsageError, match="views must be one of"):
        four.probabilities(tensor, views=3)


def test_classify_reports_the_average_and_explain_agrees_with_it() -> None:
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[:, :10] = 255  # a white strip on the left edge: "a" at 0.2 + 0.6 x 10/16 as given
    single, _ = left_bright_classifier(1)
    averaged, backend = left_bright_classifier(4)
    as_given = single.classify(image).probabilities["a"]
    prediction = averaged.classify(image)
    assert as_given == pytest.approx(0.575)
    # the left-right flips put the strip on the right (0.2): the average says "b"
    assert prediction.probabilities["a"] == pytest.approx((0.575 + 0.2) / 2) and prediction.label == "b"
    assert len(backend.seen) == 4
    explanation = occlusion_map(averaged, image, grid=2)
    assert explanation.label == prediction.label
    assert explanation.confidence == pytest.approx(prediction.confidence)
    # occlusions run one view each: 4 views + the image as given + 4 squares
    assert explanation.inferences == len(backend.seen) - 4 == 9
    # hiding the strip raises "b" (negative heat); the black right half does not matter
    assert explanation.heat[:, 0].max() < -0.1 and np.allclose(explanation.heat[:, 1], 0.0)


def test_metadata_keeps_the_views_and_refuses_nonsense() -> None:
    metadata = ModelMetadata("m", "m-1", ("a", "b"), Preprocessing(input_size=SIZE), test_time_views=8)
    data = json.loads(metadata.to_json())
    assert data["test_time_views"] == 8
    assert ModelMetadata.from_dict(data).test_time_views == 8
    del data["test_time_views"]  # files written before 0.4 average nothing
    assert ModelMetadata.from_dict(data).test_time_views == 1
    assert ModelMetadata.from_dict({**data, "test_time_views": 16}).test_time_views == 16
    for bad in (2, "4", True, None, 8.0, 32):
        with pytest.raises(ModelError, match="test_time_views"):
            ModelMetadata.from_dict({**data, "test_time_views": bad})


def test_out_of_fold_reads_the_saved_views(tmp_path: Path) -> None:
    from capsedge.workshop.run import CrossValidation, RunDir, average_views

    def out_of_fold(folder: Path, images: int, views: int = 1, quantized: str | None = None):
        return CrossValidation(folder).out_of_fold(images, views, quantized)

    rng = np.random.default_rng(0)
    every = {}
    for k, held in enumerate((np.array([0, 2]), np.array([1, 3, 4]))):
        fold = tmp_path / f"fold-{k}"
        fold.mkdir()
        views = rng.dirichlet(np.ones(3), size=(len(held), 8))
        np.save(fold / "holdout_indices.npy", held)
        np.save(fold / "holdout_probabilities.npy", views[:, 0])
        np.save(fold / RunDir.VIEWS, views)
        every[k] = views
    indices, one = out_of_fold(tmp_path, 5)
    assert indices.tolist() == [0, 2, 1, 3, 4] and np.allclose(one[:2], every[0][:, 0])
    _, four = out_of_fold(tmp_path, 5, views=4)
    assert np.allclose(four[2:], every[1][:, :4].mean(axis=1))
    assert np.allclose(average_views(every[1], 8), every[1].mean(axis=1))
    with pytest.raises(CapsedgeError, match="--score-folds"):  # the int8 files' answers: not yet
        out_of_fold(tmp_path, 5, views=1, quantized="int8")
    for k in (0, 1):
        np.save(RunDir(tmp_path / f"fold-{k}").views_file("int8"), every[k][:, :4, ::-1])  # four views
    _, int8 = out_of_fold(tmp_path, 5, views=4, quantized="int8")
    assert np.allclose(int8[:2], every[0][:, :4, ::-1].mean(axis=1))
    assert np.allclose(out_of_fold(tmp_path, 5, quantized="int8")[1][2:], every[1][:, 0, ::-1])
    with pytest.raises(CapsedgeError, match="holds 4 test-time views per image, not 8"):
        out_of_fold(tmp_path, 5, views=8, quantized="int8")
    with pytest.raises(CapsedgeError, match="not 16 .*eight dihedral"):  # the trainer saves eight
        out_of_fold(tmp_path, 5, views=16)
    (tmp_path / "fold-1" / RunDir.VIEWS).unlink()
    with pytest.raises(CapsedgeError, match="bench/test_time_views.py"):
        out_of_fold(tmp_path, 5, views=8)
    assert out_of_fold(tmp_path, 5)[1].shape == (5, 3)
