"""capsedge explain: occlusion maps that point at the evidence, drawn at the image's aspect ratio."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge.classifier import Classifier
from capsedge.cli import main
from capsedge.explain import heat_colours, occlusion_map, render_overlay, title
from capsedge.metadata import ModelMetadata
from capsedge.preprocess import Preprocessing
from capsedge.progress import Progress

from conftest import synthetic_xray

SIZE = 64
EVIDENCE = (slice(24, 32), slice(32, 48))  # in input pixels: grid cell (1, 2) of a 64x32 image, grid 4


class RegionBackend:
    """A model that answers "a" with 0.5 + 0.4 x the mean brightness of one region, else "b"."""

    name = "stub"
    input_shape = (1, SIZE, SIZE, 1)
    num_outputs = 2

    def __init__(self) -> None:
        self.runs = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.runs += 1
        p = 0.5 + 0.4 * float(batch[0][EVIDENCE].mean())
        return np.array([p, 1 - p], np.float32)


def stub_classifier() -> tuple[Classifier, RegionBackend]:
    backend = RegionBackend()
    metadata = ModelMetadata("stub", "stub-1", ("a", "b"), Preprocessing(input_size=SIZE))
    return Classifier(backend, metadata, Path("stub.tflite")), backend


def evidence_image() -> np.ndarray:
    """64 wide, 32 high: dark, with a bright patch where the stub looks (rows 8-16, columns 32-48)."""
    image = np.full((32, 64), 20, np.uint8)
    image[8:16, 32:48] = 255
    return image


def test_occlusion_heat_sits_on_the_evidence() -> None:
    classifier, backend = stub_classifier()
    steps: list[tuple[int, int]] = []
    explanation = occlusion_map(classifier, evidence_image(), grid=4,
                                progress=lambda done, total: steps.append((done, total)))
    assert explanation.label == "a" and explanation.confidence == pytest.approx(0.9)
    expected = np.zeros((4, 4))
    expected[1, 2] = 0.4  # hiding that square drops "a" from 0.9 to 0.5; no other square matters
    assert np.allclose(explanation.heat, expected, atol=1e-6)
    assert backend.runs == explanation.inferences == 17
    assert steps[-1] == (17, 17) and len(steps) == 17


def test_overlay_keeps_the_aspect_ratio_and_colours_only_the_evidence() -> None:
    classifier, _ = stub_classifier()
    picture = np.asarray(render_overlay(occlusion_map(classifier, evidence_image(), grid=4), side=256))
    title, margin = 34, 8
    image = picture[title:title + 128, margin:margin + 256].astype(int)  # 64x32 scaled to 256x128
    assert picture.shape[1] > 256 and picture.shape[0] == 128 + title + margin
    hot = image[40:56, 136:184]  # inside the patch (rows 8-16, columns 32-48 of the original, x4)
    cold = image[100:120, 10:60]
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40  # coloured
    assert np.abs(cold[..., 0] - cold[..., 2]).max() == 0  # untouched grey
    bar = picture[title:title + 128, 256 + 2 * margin + 5].astype(int)
    assert np.array_equal(bar[5], heat_colours(np.array([1.0]))[0][:3]) or bar[5, 1] > 200  # yellow top
    assert bar[-5, 2] > bar[-5, 1]  # dark blue bottom


def test_explain_command_on_the_bundled_model(tmp_path: Path) -> None:
    image = tmp_path / "xray.png"
    Image.fromarray(synthetic_xray((120, 90))).save(image)
    out = tmp_path / "overlay.png"
    result = CliRunner().invoke(main, ["explain", str(image), "--out", str(out), "--grid", "3", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["grid"] == 3 and np.asarray(record["heat"]).shape == (3, 3)
    assert record["inferences"] == 16 + 1 + 9  # the bundled model's 16 views, the image as given, 9 squares
    assert record["label"] in ("Cofield", "Depuy", "Tornier", "Zimmer")
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.width > overlay.height  # 120 wide, 90 high
    # The generated picture is no X-ray: explain carries classify's flags.
    assert record["out_of_distribution"] is True and record["answer"] is None
    assert record["ood_reason"].startswith("not like") and record["uncertain"] in (True, False)
    assert record["model_version"] == "effcaps_ncp_lite0h_512-0.9.0" and record["threshold"] > 0.5
    text = CliRunner().invoke(main, ["explain", str(image), "--out", str(out), "--grid", "2"])
    assert text.stdout.startswith(f"{image}: not a shoulder-implant X-ray, no answer: not like")
    assert not any(maker in text.stdout for maker in ("Cofield", "Depuy", "Tornier", "Zimmer"))


def test_overlay_title_carries_the_flags() -> None:
    classifier, _ = stub_classifier()  # no calibration, no outlier statistics
    explanation = occlusion_map(classifier, evidence_image(), grid=2)
    assert explanation.prediction.uncertain is None
    assert title(explanation).startswith("a (90.0 %, uncalibrated): where hiding")
    assert explanation.to_dict()["calibrated"] is False
    flagged = replace(explanation, prediction=replace(explanation.prediction, threshold=0.95, uncertain=True))
    assert title(flagged).startswith("a (90.0 %, UNCERTAIN)")
    outside = replace(explanation, prediction=replace(explanation.prediction, out_of_distribution=True))
    assert title(outside).startswith("Not a shoulder-implant X-ray: no answer")
    assert "a (" not in title(outside)


def test_explain_command_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["explain", str(bad), "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("capsedge: error:")


def test_progress_is_quiet_for_quick_work_and_plain_lines_in_logs() -> None:
    log = io.StringIO()
    with Progress("job", stream=log, show_after=3600) as bar:
        for done in range(1, 11):
            bar.update(done, 10)
    assert log.getvalue() == ""  # expected to finish well within the hour
    with Progress("job", stream=log, show_after=0.0, log_every=3600) as bar:
        for done in range(1, 11):
            bar.update(done, 10, note=f"step {done}")
    lines = log.getvalue().splitlines()  # the first line, then (an hour apart at most) the last
    assert [line.split(" (")[0] for line in lines] == ["job: 1/10 step 1", "job: 10/10 step 10"]
    assert all("\r" not in line for line in lines)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar() -> None:
    screen = Terminal()
    with Progress("job", total=4, stream=screen, show_after=0.0) as bar:
        for done in range(1, 5):
            bar.update(done, note="x")
    assert "\r" in screen.getvalue() and "job: 100%" in screen.getvalue() and "4/4" in screen.getvalue()
