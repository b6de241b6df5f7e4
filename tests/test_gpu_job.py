"""The GPU job of stage 1 (train/gpu_stage1.sh), run here with tiny settings on the CPU: its
parts in parallel, stopped and run again, packed for transport, readable by stage 2."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, synthetic_xray

pytest.importorskip("tensorflow")

JOB = REPO / "train" / "gpu_stage1.sh"
# A variant of the recipe, as a GPU session would try one.
VARIANT = "--label-smoothing 0 --warmup 0.2 --schedule one-cycle"


@pytest.mark.slow
def test_the_gpu_job_resumes_after_being_stopped_and_packs_every_part(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        Image.fromarray(synthetic_xray(seed=i)).save(data / f"Depuy.{i}.png")
        Image.fromarray(np.rot90(synthetic_xray(seed=50 + i))).save(data / f"Zimmer.{i}.png")
    out = tmp_path / "out"
    capsedge = shutil.which("capsedge", path=str(Path(sys.executable).parent)) or "capsedge"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CAPSEDGE": capsedge, "PYTHON": sys.executable,
           "CAPSEDGE_COMMIT": "abc123",
           "WORKERS": "1", "PARALLEL": "1",  # one part at a time: fold 0 backs up soonest on a busy CPU
           "STAGE1_OPTIONS": VARIANT}
    command = ["bash", str(JOB), str(data), str(out), "3", "lite0_linear_224", "2"]

    # Stop the whole job (every part) once fold 0 has backed up an epoch, as a lost machine would.
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    metadata = out / "stage1" / "fold-0" / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 900
    while not metadata.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.poll() is None, job.stdout.read().decode() if job.stdout else ""
    time.sleep(0.5)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    stopped_at = json.loads(metadata.read_text())["epoch"]
    assert 1 <= stopped_at < 3

    # The folds alone (PARTS), as a session that finishes some parts of a cross-validation: no summary yet.
    folds_only = subprocess.run(command, env={**env, "PARTS": "0 1"}, capture_output=True, text=True,
                                timeout=600)
    assert folds_only.returncode == 1, folds_only.stdout + folds_only.stderr
    assert "no summary yet: final not done" in folds_only.stdout
    assert not (out / "stage1" / "final").exists()
    history = (out / "stage1" / "fold-0" / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == [0, 1, 2]  # resumed, not restarted
    assert not (out / "stage1" / "fold-0" / "backup").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "stage 1 done" in again.stdout

    packs = sorted(p.name for p in (out / "pack").iterdir())
    assert packs == ["stage1-final.tar.gz", "stage1-fold-0.tar.gz", "stage1-fold-1.tar.gz",
                     "stage1-summary.tar.gz"]
    unpacked = tmp_path / "unpacked"
    for pack in (out / "pack").iterdir():
        with tarfile.open(pack) as archive:
            assert not [m.name for m in archive.getmembers() if m.name.endswith("classifier.keras")]
            archive.extractall(unpacked, filter="data")
    for part in ("fold-0", "fold-1", "final"):
        assert (unpacked / part / "trunk.npz").is_file()
    summary = json.loads((unpacked / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and summary["train"]["augment"] == "full"
    assert summary["train"]["label_smoothing"] == 0 and summary["train"]["warmup"] == 0.2
    assert summary["train"]["schedule"] == "one-cycle"
    provenance = json.loads((unpacked / "provenance.json").read_text())
    assert provenance["commit"] == "abc123" and provenance["versions"]["backend"] == "tensorflow"
    assert provenance["versions"]["tensorflow"] == importlib.metadata.version("tensorflow")
    assert provenance["command"].startswith(f'STAGE1_OPTIONS="{VARIANT}" ')
    assert provenance["machine"]["cpus"] == os.cpu_count()
