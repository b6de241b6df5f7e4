"""The device path never imports TensorFlow, Keras or other training libraries, nor the web server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, synthetic_xray

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
    pytest.importorskip("keras")
    loaded = capsedge_modules_after("import capsedge.models")
    assert not loaded & RUNTIME_MODULES, loaded & RUNTIME_MODULES
    assert all(m in GROUND or m.startswith("capsedge.models") for m in loaded), loaded


def test_train_and_export_load_only_the_floors_below() -> None:
    for floor, sibling in (("train", "export"), ("export", "train")):
        loaded = capsedge_modules_after(f"import capsedge.{floor}.cli" if floor == "train"
                                        else "import capsedge.export.cli")
        assert not any(m.startswith(f"capsedge.{sibling}") for m in loaded), (floor, loaded)
        assert all(m in GROUND | RUNTIME_MODULES
                   or m.startswith(("capsedge.models", "capsedge.workshop", f"capsedge.{floor}"))
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
    pytest.importorskip("tensorflow")
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_xray()).save(image)
    command = [sys.executable, "-m", "capsedge.cli", "capsules", str(image), "--run", str(tmp_path),
               "--out", str(tmp_path / "g.png")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"capsedge: error: {tmp_path} is not a training run "
                                        "(no classifier.keras, config.json)"]


def package_folders() -> dict[str, str]:
    """setup.py's ``package_dir``: package name to the folder that holds it."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    mapping = next(k.value for k in call.keywords if k.arg == "package_dir")
    return ast.literal_eval(mapping)


def floor_of(module: str, folders: dict[str, str]) -> str | None:
    """The folder a ``capsedge`` module lives in (the longest package prefix wins); ``None``
    for a module that is not capsedge's."""
    owners = [package for package in folders if module == package or module.startswith(package + ".")]
    return folders[max(owners, key=len)] if owners else None


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function (relative imports
    resolved against ``package``); ``from capsedge import X`` counts as ``capsedge.X``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


#: Which floors each floor may not import (bottom up: edge and models, workshop, train and export).
FORBIDDEN = {
    "edge": {"workshop", "train", "export"},
    "models": {"workshop", "train", "export"},
    "workshop": {"train", "export"},
    "export": {"train"},
    "train": set(),
}


def test_no_module_imports_a_floor_above_it_not_even_inside_a_function() -> None:
    folders = package_folders()
    packages = {folder: package for package, folder in folders.items()}
    assert set(FORBIDDEN) <= set(packages), packages
    wrong = []
    for floor, forbidden in FORBIDDEN.items():
        files = sorted((REPO / floor).rglob("*.py"))
        assert files, floor
        for path in files:
            for module in imported_modules(path, packages[floor]):
                target = floor_of(module, folders)
                if target in forbidden:
                    wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, wrong


def test_the_import_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from .run import RunDir\n"
                      "def f():\n    from capsedge.train.data import read_dataset\n"
                      "    import capsedge.export.cli\n    from capsedge import views\n")
    folders = package_folders()
    found = imported_modules(source, "capsedge.workshop")
    assert {"capsedge.workshop.run", "capsedge.train.data", "capsedge.export.cli", "capsedge.views"} <= found
    assert {floor_of(m, folders) for m in found} == {"workshop", "train", "export", "edge"}
