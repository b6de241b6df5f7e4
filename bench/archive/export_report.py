"""Export a run to every format and verify it on the development hold-out split.

Calibration uses the run's training part and verification its held-out part,
both rebuilt from the stratified 80/20 split with the run's seed (the split
`capsedge train` uses), as folders of links in a temporary directory.

Usage:
    python bench/archive/export_report.py --run RUN_DIR --out DIR [--data DIR]

Writes the artifacts, report.json and report.md into DIR; exits 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ALL_FORMATS = ("tflite-f32", "tflite-f16", "tflite-int8", "onnx", "onnx-int8", "edgetpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def link_folder(paths: list[Path], folder: Path) -> Path:
    """A folder of symbolic links to ``paths`` (names kept: labels come from them)."""
    folder.mkdir(parents=True)
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def main() -> None:
    parser = common.parser(__doc__, out_required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--formats", default=",".join(ALL_FORMATS))
    args = parser.parse_args()

    from capsedge.export.verify import verify_export
    from capsedge.export.writer import ExportOptions, export
    from capsedge.train.metrics import stratified_split
    from capsedge.workshop.dataset import read_dataset

    config = json.loads((args.run / "config.json").read_text())
    train = config["train"]
    dataset = read_dataset(common.data_folder(args))
    train_idx, held_idx = stratified_split(dataset.targets, train["holdout"], train["seed"])
    with tempfile.TemporaryDirectory(prefix="capsedge-report-") as folder:
        calibration = link_folder([dataset.paths[i] for i in train_idx], Path(folder) / "train")
        evaluation = link_folder([dataset.paths[i] for i in held_idx], Path(folder) / "holdout")
        options = ExportOptions(formats=tuple(args.formats.split(",")), calibration=calibration)
        report = verify_export(export(args.run, args.out, options), evaluation)
    print((args.out / "report.md").read_text())
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
