"""capsedge on 64-bit ARM, emulated: the arm64 install answers as x86-64 does (bench/arm64_check.py).

Runs when qemu-aarch64 and the assembled environment (``python bench/arm64_check.py
--assemble-only``, into ``.arm64/``) are there; skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, implant_data

sys.path.insert(0, str(REPO / "bench"))
import arm64_check  # noqa: E402


@pytest.fixture(scope="module")
def arm() -> arm64_check.ArmEnv:
    if arm64_check.find_qemu() is None:
        pytest.skip("qemu-aarch64 not installed (apt-get install qemu-user)")
    env = arm64_check.ArmEnv(arm64_check.DEFAULT_ENV)
    if not env.is_ready():
        pytest.skip(f"no arm64 environment at {env.path} (python bench/arm64_check.py --assemble-only)")
    return env


@pytest.mark.slow
def test_arm64_answers_as_x86_64(arm: arm64_check.ArmEnv) -> None:
    pytest.importorskip("pydicom", reason="the check writes a DICOM of an X-ray (the dicom extra)")
    images = arm64_check.pick_images(implant_data(), 2)
    # A Raspberry Pi 4's CPU only, to keep CI's time down (emulation runs a classification in
    # about 10 s); `python bench/arm64_check.py` compares the Pi 5's Cortex-A76 too.
    cpus = ["cortex-a72"]
    report = arm64_check.check(arm, images, cpus=cpus, api_images=1)

    assert report["env"]["machine"] == "aarch64"
    # Per CPU: the X-rays and the DICOM made from the first; then the API and the server.
    assert report["compared"] == len(cpus) * (len(images) + 1) + 2
    assert report["mismatches"] == []
    assert report["labels_differ"] == 0
    assert report["max_difference"] <= report["tolerance"] < 0.01  # one step of the int8 output


def test_a_mismatch_is_reported() -> None:
    reference = {"label": "Depuy", "uncertain": False, "probabilities": {"Depuy": 0.9, "Zimmer": 0.1}}
    comparison = arm64_check.Comparison(tolerance=0.01)
    comparison.add("same", reference, dict(reference))
    comparison.add("other", reference, {"label": "Zimmer", "uncertain": False,
                                        "probabilities": {"Depuy": 0.4, "Zimmer": 0.6}})
    assert comparison.compared == 2
    assert comparison.identical == 1
    assert comparison.labels_differ == 1
    assert comparison.max_difference == pytest.approx(0.5)
    assert [m.split(":")[0] for m in comparison.mismatches] == ["other", "other", "other"]
