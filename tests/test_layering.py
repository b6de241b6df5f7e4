"""The device path never imports TensorFlow, Keras or other training libraries, nor the web server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import synthetic_xray

HEAVY = ("tensorflow", "keras", "tf2onnx", "ncps", "onnx")
#: The serve extra: only `capsedge serve` imports it.
SERVER = ("starlette", "uvicorn", "python_multipart", "anyio", "httpx")


def test_classify_runs_without_importing_training_libraries(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_xray()).save(image)
    script = f"""
import sys
from click.testing import CliRunner
import capsedge
from capsedge.cli import main
result = CliRunner().invoke(main, ["classify", "--json", {str(image)!r}])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("HEAVY", heavy)
server = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER!r})
print("SERVER", server)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    assert "SERVER []" in done.stdout, done.stdout


#: The floors, bottom up: the ground (errors), the runtime, the networks; training and export on top.
GROUND = {"capsedge", "capsedge.errors"}
RUNTIME_MODULES = {"capsedge.classifier", "capsedge.backends", "capsedge.preprocess", "capsedge.metadata",
                   "capsedge.dicom", "capsedge.cli", "capsedge.trust", "capsedge.limits", "capsedge.boundary",
                   "capsedge.folders", "capsedge.views", "capsedge.outputs", "capsedge.quiet",
                   "capsedge.model_guard", "capsedge.progress"}


def capsedge_modules_after(statement: str) -> set[str]:
    """The ``capsedge`` modules a fresh interpreter has loaded after running ``statement``."""
    script = (f"import sys\n{statement}\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'capsedge'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own printed list


def test_the_ground_floor_loads_nothing_else() -> None:
    assert capsedge_modules_after("import capsedge.errors") == GROUND
    assert capsedge_modules_after("import capsedge") == {"capsedge"}


def test_models_load_no_runtime() -> None:
    loaded = capsedge_modules_after("import capsedge.models")
    assert not loaded & RUNTIME_MODULES, loaded & RUNTIME_MODULES
    assert all(m in GROUND or m.startswith("capsedge.models") for m in loaded), loaded


def test_train_and_export_load_only_the_floors_below() -> None:
    for floor, sibling in (("train", "export"), ("export", "train")):
        loaded = capsedge_modules_after(f"import capsedge.{floor}.cli" if floor == "train"
                                        else "import capsedge.export.cli")
        assert not any(m.startswith(f"capsedge.{sibling}") for m in loaded), (floor, loaded)
        assert all(m in GROUND | RUNTIME_MODULES or m.startswith(("capsedge.models", f"capsedge.{floor}"))
                   for m in loaded), (floor, loaded)


def test_train_checks_its_arguments_before_importing_tensorflow(tmp_path: Path) -> None:
    script = f"""
import sys
from click.testing import CliRunner
from capsedge.cli import main
result = CliRunner().invoke(main, ["train", "--data", {str(tmp_path / "none")!r}, "--out", {str(tmp_path)!r}])
assert result.exit_code == 1 and "data not found" in result.stderr, result.output
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_tensorflow_commands_print_one_line_not_its_start_up_noise(tmp_path: Path) -> None:
    """`capsedge capsules` imports TensorFlow, then fails on a folder that is no run: stderr
    holds the one error line (no oneDNN, CUDA or absl lines from TensorFlow's C++ start-up)."""
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_xray()).save(image)
    command = [sys.executable, "-m", "capsedge.cli", "capsules", str(image), "--run", str(tmp_path),
               "--out", str(tmp_path / "g.png")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"capsedge: error: {tmp_path} is not a training run "
                                        "(no classifier.keras, config.json)"]
