"""Does capsedge install on 64-bit ARM and answer as on x86-64? Checked under qemu-aarch64.

Assembles, from the package registries only, the user space of a Raspberry Pi
OS (Debian bookworm) arm64 board in ``.arm64/`` with capsedge installed
(bench/arm64_env.py). Then it runs ``capsedge classify --json`` (X-rays and a DICOM made from the first)
under qemu-aarch64 on each emulated CPU, the Python API and ``capsedge serve``
(one request) on the first, and compares every label, flag and probability
with ``capsedge classify --json`` on this x86-64 machine, same files, same
bundled model::

    apt-get install -y qemu-user        # qemu-aarch64
    python bench/arm64_check.py --data DIR    # 4 X-rays of DIR and a DICOM, both CPUs
    python bench/arm64_check.py --data DIR --all --cpus cortex-a72   # all of them (hours emulated)
    python bench/arm64_check.py --assemble-only                      # the environment only (CI)

Emulation checks function and numbers, not speed. The environment is
assembled once and reused; capsedge itself is reinstalled when the working
tree's wheel (code or bundled model) changes. With --out, the report is also written to
OUT/arm64_check.json. tests/test_arm64.py runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve_burst  # noqa: E402  (starts a server and posts an image)
from arm64_env import CPUS, DEFAULT_ENV, ArmEnv, assemble, find_qemu, log, refresh, run  # noqa: E402

#: Largest difference allowed between an arm64 and the x86-64 probability of a float model.
#: An int8 model is allowed one step of its output's quantization (``output_step``): XNNPACK's
#: int8 kernels for ARM and for x86 round some intermediate values differently (docs/arm64.md).
FLOAT_TOLERANCE = 1e-6

#: The fields of ``capsedge classify --json`` that must be identical.
EXACT_FIELDS = ("label", "uncertain", "out_of_distribution", "ood_reason", "model_version", "threshold",
                "error")


def write_dicom(jpeg: Path, path: Path) -> Path:
    """A 12-bit MONOCHROME2 DICOM of a JPEG X-ray (needs pydicom here)."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def classify_json(command: Sequence[str], images: Sequence[Path]) -> tuple[dict[str, dict], float]:
    """``COMMAND classify --json IMAGES``: the answers by path, and the wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run([*command, "classify", "--json", *map(str, images)], capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    answers = {row["path"]: row for row in map(json.loads, result.stdout.splitlines())}
    if result.returncode != 0 or len(answers) != len(images):
        raise RuntimeError(f"classify exited {result.returncode} with {len(answers)} of {len(images)} "
                           f"answers:\n{result.stderr[-4000:]}")
    return answers, seconds


API = """import json, sys
from capsedge import Classifier
classifier = Classifier.load()
for path in sys.argv[1:]:
    print(json.dumps({"path": path, **classifier.classify(path).to_dict()}))"""


def api_json(python: Sequence[str], images: Sequence[Path]) -> dict[str, dict]:
    """The Python API's answers (``Classifier.load().classify``) by path."""
    result = run([*python, "-c", API, *map(str, images)])
    return {row["path"]: row for row in map(json.loads, result.stdout.splitlines())}


def serve_answer(command: Sequence[str], image: Path) -> dict:
    """``capsedge serve`` on a loopback port answers one ``POST /api/classify`` of ``image``."""
    with tempfile.NamedTemporaryFile(suffix=".log") as server_log:
        process, url = serve_burst.start_server(log=server_log, command=command, timeout=600)
        try:
            status, answer = serve_burst.post_image(url, image.read_bytes(), image.name, timeout=600)
        finally:
            serve_burst.stop_server(process)
    if status != 200:
        raise RuntimeError(f"capsedge serve answered {status}: {answer}")
    return answer


@dataclass
class Comparison:
    """How the arm64 answers compare with the x86-64 ones."""

    tolerance: float = FLOAT_TOLERANCE
    compared: int = 0
    labels_differ: int = 0
    identical: int = 0
    max_difference: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    def add(self, name: str, reference: dict, answer: dict) -> None:
        """Compare one answer (a classify/API/serve JSON object) with its reference."""
        self.compared += 1
        self.labels_differ += reference.get("label") != answer.get("label")
        for key in EXACT_FIELDS:
            if key in reference and reference.get(key) != answer.get(key):
                self.mismatches.append(f"{name}: {key} {reference.get(key)!r} on x86-64, "
                                       f"{answer.get(key)!r} on arm64")
        ours, theirs = reference.get("probabilities") or {}, answer.get("probabilities") or {}
        if ours.keys() != theirs.keys():
            self.mismatches.append(f"{name}: labels {sorted(ours)} against {sorted(theirs)}")
            return
        self.identical += ours == theirs
        for label in ours:
            difference = abs(ours[label] - theirs[label])
            self.max_difference = max(self.max_difference, difference)
            if difference > self.tolerance:
                self.mismatches.append(f"{name}: P({label}) {ours[label]:.9f} on x86-64, "
                                       f"{theirs[label]:.9f} on arm64")


def output_step(model: Path) -> float:
    """One quantization step of the model's output (its scale), or FLOAT_TOLERANCE for a float
    output."""
    from ai_edge_litert.interpreter import Interpreter

    scale, _ = Interpreter(model_path=str(model)).get_output_details()[0]["quantization"]
    return float(scale) if scale > 0 else FLOAT_TOLERANCE


def installed_model(arm: ArmEnv) -> Path:
    """The bundled model as installed in the arm64 venv."""
    (model,) = (arm.venv / "lib").glob("python*/site-packages/capsedge/assets/default.tflite")
    return model


def check(arm: ArmEnv, images: Sequence[Path], cpus: Sequence[str] = tuple(CPUS),
          api_images: int = 2, serve: bool = True) -> dict:
    """Classify ``images`` (and a DICOM of the first) on x86-64 and on each emulated CPU; compare.

    The Python API runs on the first ``api_images`` and ``capsedge serve`` answers one request,
    both on the first CPU. Returns a report: what was compared, the largest probability
    difference, every mismatch, and the wall times.
    """
    from capsedge.classifier import default_model_path

    versions = refresh(arm)
    model = default_model_path()
    if model.read_bytes() != installed_model(arm).read_bytes():
        raise RuntimeError(f"the arm64 venv's bundled model differs from {model}")
    comparison = Comparison(tolerance=output_step(model))
    report: dict = {"env": versions, "model": str(model), "images": len(images),
                    "tolerance": comparison.tolerance, "seconds": {}}
    with tempfile.TemporaryDirectory() as folder:
        inputs = [*images, write_dicom(images[0], Path(folder) / "first.dcm")]
        host = [sys.executable, "-m", "capsedge.cli"]
        reference, report["seconds"]["x86-64 classify"] = classify_json(host, inputs)
        for cpu in cpus:
            log(f"{cpu}: capsedge classify --json, {len(inputs)} files")
            answers, seconds = classify_json(arm.capsedge(cpu), inputs)
            report["seconds"][f"{cpu} classify"] = seconds
            for path, answer in answers.items():
                comparison.add(f"{cpu} classify {Path(path).name}", reference[path], answer)
        cpu = cpus[0]
        if api_images:
            log(f"{cpu}: the Python API, {api_images} files")
            start = time.perf_counter()
            for path, answer in api_json(arm.python(cpu), inputs[:api_images]).items():
                comparison.add(f"{cpu} API {Path(path).name}", reference[path], answer)
            report["seconds"][f"{cpu} API"] = time.perf_counter() - start
        if serve:
            log(f"{cpu}: capsedge serve, one request")
            start = time.perf_counter()
            answer = serve_answer(arm.capsedge(cpu), images[0])
            comparison.add(f"{cpu} serve {images[0].name}", reference[str(images[0])], answer)
            report["seconds"][f"{cpu} serve"] = time.perf_counter() - start
    report.update(compared=comparison.compared, labels_differ=comparison.labels_differ,
                  identical=comparison.identical, max_difference=comparison.max_difference,
                  mismatches=comparison.mismatches)
    return report


def pick_images(folder: Path, count: int | None) -> list[Path]:
    """``count`` X-rays of ``folder`` spread over its makers (all when ``count`` is None)."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not images:
        raise SystemExit(f"no images in {folder}")
    if count is None or count >= len(images):
        return images
    by_maker: dict[str, list[Path]] = {}
    for image in images:
        by_maker.setdefault(image.name.split(".")[0], []).append(image)
    picked: list[Path] = []
    while len(picked) < count:
        for group in by_maker.values():
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return picked


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="Where the environment is cached.")
    parser.add_argument("--count", type=int, default=4, help="How many X-rays (spread over makers).")
    parser.add_argument("--all", action="store_true", help="Every X-ray of --data.")
    parser.add_argument("--cpus", default=",".join(CPUS), help=f"Emulated CPUs, of {', '.join(CPUS)}.")
    parser.add_argument("--assemble-only", action="store_true", help="Assemble the environment, no check.")
    parser.add_argument("--rebuild", action="store_true", help="Assemble again even if cached.")
    args = parser.parse_args()

    cpus = [cpu.strip() for cpu in args.cpus.split(",") if cpu.strip()]
    unknown = [cpu for cpu in cpus if cpu not in CPUS]
    if unknown or not cpus:
        parser.error(f"--cpus: unknown {unknown}; choose from {', '.join(CPUS)}")
    if find_qemu() is None:
        sys.exit("arm64: qemu-aarch64 not found: apt-get install qemu-user")
    arm = ArmEnv(args.env)
    if args.rebuild or not arm.is_ready():
        assemble(args.env)
    if args.assemble_only:
        return
    report = check(arm, pick_images(common.data_folder(args), None if args.all else args.count), cpus)
    common.save_json(args, "arm64_check.json", report)
    print(json.dumps(report, indent=1))
    if report["mismatches"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
