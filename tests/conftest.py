"""Shared fixtures: generated images, and the development data when it is present."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IMPLANTS = SHARED_DATA / "shoulder-implants"
MNIST = SHARED_DATA / "mnist-t10k"


def implant_data() -> Path:
    """The development X-rays, or skip the test with the reason."""
    if not IMPLANTS.is_dir() or not any(IMPLANTS.glob("*.jpg")):
        pytest.skip(f"development data not found at {IMPLANTS} (see README, 'Data')")
    return IMPLANTS


def synthetic_xray(size: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    """A uint8 greyscale picture with a bright implant-like bar on a darker background."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    image = 40 + 30 * rng.random((height, width))
    image[(np.abs(xx - width * 0.5) < width * 0.08) & (yy > height * 0.3)] = 230
    image += 200 * np.exp(-(((xx - width * 0.5) ** 2 + (yy - height * 0.3) ** 2) / (0.02 * width * height)))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def xray_png(tmp_path: Path) -> Path:
    """A generated greyscale PNG."""
    path = tmp_path / "xray.png"
    Image.fromarray(synthetic_xray()).save(path)
    return path


def ncps_cfc(units: int, output_size: int, name: str | None = None) -> Any:
    """The ``ncps`` layer that ``UnrolledCfC`` replaces (and that earlier versions saved)."""
    from ncps.keras import CfC
    from ncps.wirings import AutoNCP

    return CfC(AutoNCP(units, output_size), unroll=True, return_sequences=False, name=name)


def classifier_with_ncps_cfc(config: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``config``'s classifier as versions before ``UnrolledCfC`` built it (an ``ncps`` CfC head)."""
    from capsedge.models import build_model, heads

    with monkeypatch.context() as patch:
        patch.setattr(heads, "UnrolledCfC", lambda units, k, name: ncps_cfc(units, k, name))
        return build_model(config).classifier


def bench_script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``bench/<name>.py`` imported as a module (with ``bench/`` on the path, for its ``common``)."""
    folder = REPO / "bench"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
