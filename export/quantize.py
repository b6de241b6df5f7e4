"""Export a trained run to device artifacts: ``python export/quantize.py --help``.

Also reachable as ``capsedge export``. Each format writes one model file with
its metadata embedded and a sidecar ``<stem>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from capsedge import __version__
from capsedge.errors import CapsedgeError, ModelError, missing_extra
from capsedge.metadata import ModelMetadata
from capsedge.preprocess import Preprocessing, preprocess


@dataclass(frozen=True)
class ExportFormat:
    """One row of the format table: what the CLI offers, what it needs, what it writes."""

    name: str
    suffix: str
    quantization: str
    extra: str
    device: str


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("tflite-f32", ".tflite", "float32", "export", "any CPU (LiteRT)"),
        ExportFormat("tflite-f16", ".tflite", "float16", "export", "CPU, mobile GPU delegates"),
        ExportFormat("tflite-dynamic", ".tflite", "dynamic", "export", "CPU, smaller file"),
        ExportFormat("tflite-int8", ".tflite", "int8", "export", "CPU, Raspberry Pi, microcontrollers"),
    )
}


@dataclass(frozen=True)
class TrainedRun:
    """A trained classifier with what the run recorded about it."""

    classifier: Any
    name: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    provenance: dict[str, Any]


def load_run(path: str | Path) -> TrainedRun:
    """Load a run folder written by ``capsedge train`` (or its ``classifier.keras``).

    Raises:
        ModelError: the folder or model is missing or incomplete.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    model_file = run_dir / "classifier.keras" if path.is_dir() else path
    config_file = run_dir / "config.json"
    if not model_file.is_file():
        raise ModelError(f"no trained model at {model_file}")
    if not config_file.is_file():
        raise ModelError(f"no config.json beside {model_file.name} in {run_dir}")
    try:
        import capsedge.models  # noqa: F401 - registers the custom layers for loading
        import keras
    except ImportError as exc:
        raise missing_extra(exc.name or "tensorflow", "export") from None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    try:
        classifier = keras.models.load_model(model_file, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ModelError(f"cannot load {model_file} ({type(exc).__name__}: {exc})") from None
    provenance = {
        "data": config.get("data", {}),
        "attribution": config.get("data", {}).get("attribution", ""),
        "training": config.get("train", {}),
        "metrics": {k: v for k, v in metrics.items() if k != "holdout"}
        | ({"holdout": _summary(metrics["holdout"])} if "holdout" in metrics else {}),
    }
    return TrainedRun(
        classifier=classifier,
        name=config.get("model", {}).get("name", "unknown"),
        labels=tuple(config["classes"]),
        preprocessing=Preprocessing.from_dict(config["preprocessing"]),
        provenance=provenance,
    )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "confusion_matrix", "classes")
    return {k: report[k] for k in keys if k in report}


def calibration_images(
    source: str | Path, preprocessing: Preprocessing, limit: int = 200, seed: int = 0
) -> Callable[[], Iterable[np.ndarray]]:
    """Up to ``limit`` preprocessed images from a folder (any layout), for int8 calibration.

    Raises:
        CapsedgeError: the folder has no readable images.
    """
    folder = Path(source)
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise CapsedgeError(f"no calibration images found in {folder}")
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    images = [preprocess(p, preprocessing) for p in chosen]
    return lambda: iter(images)


def export(
    model: str | Path,
    out_dir: str | Path,
    formats: Iterable[str] = ("tflite-f32",),
    calibration: str | Path | None = None,
    version: str | None = None,
) -> dict[str, Path]:
    """Export a trained run to each of ``formats`` in ``out_dir``.

    Returns:
        Format name to the file written.

    Raises:
        CapsedgeError: unknown format, missing calibration data, or a model that cannot load.
    """
    from capsedge.export.tflite_format import Quantization, export_tflite

    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CapsedgeError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    run = load_run(model)
    metadata = ModelMetadata(
        name=run.name,
        version=version or f"{run.name}-{__version__}",
        labels=run.labels,
        preprocessing=run.preprocessing,
        provenance=run.provenance,
    )
    out = Path(out_dir)
    written = {}
    for name in formats:
        fmt = FORMATS[name]
        if fmt.quantization == "int8":
            if calibration is None:
                raise CapsedgeError(f"{name} needs calibration images: pass --calib DIR")
            quantization = Quantization.for_int8(calibration_images(calibration, run.preprocessing))
        else:
            quantization = Quantization(fmt.quantization)
        stamped = replace(
            metadata,
            provenance={**metadata.provenance, "format": name, "exporter": f"capsedge {__version__}"},
        )
        path = out / f"{run.name}_{name.replace('-', '_')}{fmt.suffix}"
        written[name] = export_tflite(run.classifier, path, stamped, quantization=quantization)
    return written


def _cli() -> Any:
    import click

    @click.command(name="export", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", "model", required=True, type=click.Path(path_type=Path),
                  help="A run folder from 'capsedge train', or its classifier.keras.")
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                  help="Folder for the exported files.")
    @click.option("--formats", default="tflite-f32", show_default=True,
                  help=f"Comma-separated: {', '.join(FORMATS)}.")
    @click.option("--calib", type=click.Path(path_type=Path), default=None,
                  help="Folder of images for int8 calibration.")
    @click.option("--version", "version", default=None, help="Model version to record.")
    def command(model: Path, out_dir: Path, formats: str, calib: Path | None,
                version: str | None) -> None:
        """Export a trained model to TFLite files that 'capsedge classify' runs."""
        try:
            written = export(model, out_dir, [f.strip() for f in formats.split(",") if f.strip()],
                             calib, version)
        except CapsedgeError as exc:
            click.echo(f"capsedge: error: {exc}", err=True)
            raise SystemExit(1) from None
        for name, path in written.items():
            click.echo(f"{name}: {path} ({path.stat().st_size / 1024:.1f} KiB)")

    return command


command = _cli()

if __name__ == "__main__":
    command()
