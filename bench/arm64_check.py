"""Does capsedge install on 64-bit ARM and answer as on x86-64? Checked under qemu-aarch64.

Assembles, from the package registries only, the user space of a Raspberry Pi
OS (Debian bookworm) arm64 board in ``.arm64/`` (ignored by git): Debian's
arm64 Python 3.11 (``apt-get install --download-only`` with a private apt
state, ``dpkg -x``), a virtual environment made by that Python, and capsedge
installed into it by pip from a wheel built here plus the aarch64 wheels of
its dependencies (``pip download --platform manylinux_*_aarch64``). Then it
runs ``capsedge classify --json`` (X-rays and a DICOM made from the first)
under qemu-aarch64 on each emulated CPU, the Python API and ``capsedge serve``
(one request) on the first, and compares every label, flag and probability
with ``capsedge classify --json`` on this x86-64 machine, same files, same
bundled model::

    apt-get install -y qemu-user        # qemu-aarch64
    python bench/arm64_check.py         # 4 X-rays of ../shared/data and a DICOM, both CPUs
    python bench/arm64_check.py --all --cpus cortex-a72   # all of them (hours under emulation)

Emulation checks function and numbers, not speed. The environment is
assembled once and reused; capsedge itself is reinstalled when the working
tree's wheel (code or bundled model) changes. tests/test_arm64.py runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_burst  # noqa: E402  (starts a server and posts an image)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENV = REPO / ".arm64"
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "shoulder-implants"

#: Raspberry Pi OS bookworm's Python; ai-edge-litert has aarch64 wheels for it.
PYTHON = "3.11"
DEBIAN_PACKAGES = [f"python{PYTHON}", f"python{PYTHON}-venv", "libstdc++6"]
#: bookworm's glibc is 2.36: every manylinux tag up to it.
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]
EXTRAS = "dicom,serve"

#: The cores of a Raspberry Pi 4 and 5. Their /proc/cpuinfo identity (implementer, part,
#: features), which qemu-user does not fake: see ``write_cpuinfo``.
CPUS = {
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
                                        "cpuid asimdrdm lrcpc dcpop asimddp"),
}

#: Largest difference allowed between an arm64 and the x86-64 probability of a float model.
#: An int8 model is allowed one step of its output's quantization (``output_step``): XNNPACK's
#: int8 kernels for ARM and for x86 round some intermediate values differently (docs/arm64.md).
FLOAT_TOLERANCE = 1e-6

#: The fields of ``capsedge classify --json`` that must be identical.
EXACT_FIELDS = ("label", "uncertain", "out_of_distribution", "ood_reason", "model_version", "threshold",
                "error")


def find_qemu() -> str | None:
    """The qemu-aarch64 user-mode emulator on PATH, if any."""
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def log(message: str) -> None:
    print(f"arm64: {message}", file=sys.stderr, flush=True)


def run(command: Sequence[str]) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output."""
    result = subprocess.run(list(command), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} exited {result.returncode}:\n"
                           f"{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return result


@dataclass(frozen=True)
class ArmEnv:
    """An assembled arm64 environment: the Debian root, a root per CPU, the venv and its wheels."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def venv(self) -> Path:
        return self.path / "venv"

    @property
    def wheels(self) -> Path:
        return self.path / "wheels"

    @property
    def ready(self) -> Path:
        return self.path / "ready.json"

    def cpu_root(self, cpu: str) -> Path:
        return self.path / "cpu" / cpu

    def is_ready(self) -> bool:
        return self.ready.is_file() and (self.venv / "bin" / "capsedge").is_file()

    def python(self, cpu: str) -> list[str]:
        """The command that runs the venv's arm64 Python on an emulated ``cpu``.

        qemu-user cannot exec another arm64 program by itself (no binfmt_misc here), so
        console scripts are run as ``python SCRIPT``, and nothing here may spawn
        ``sys.executable``.
        """
        qemu = find_qemu()
        if qemu is None:
            raise RuntimeError("qemu-aarch64 not found: apt-get install qemu-user")
        return [qemu, "-cpu", cpu, "-L", str(self.cpu_root(cpu)), str(self.venv / "bin" / "python")]

    def capsedge(self, cpu: str) -> list[str]:
        return [*self.python(cpu), str(self.venv / "bin" / "capsedge")]


def private_apt(env: Path) -> list[str]:
    """apt-get options for an arm64-only apt with its own state under ``env/apt``.

    The host's dpkg and apt configuration are left alone; the Debian sources are this
    machine's own.
    """
    apt = env / "apt"
    for folder in ("etc/sources.list.d", "etc/preferences.d", "state/lists/partial",
                   "cache/archives/partial"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    sources = [p for p in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
               if p.is_file() and p.read_text().strip()]
    if not sources:
        raise RuntimeError("no Debian apt sources found in /etc/apt")
    shutil.copy(sources[0], apt / "etc" / ("sources.list.d" if sources[0].suffix == ".sources" else "")
                / sources[0].name)
    keys = apt / "etc" / "trusted.gpg.d"  # for sources without a Signed-By of their own
    if Path("/etc/apt/trusted.gpg.d").is_dir() and not keys.exists():
        keys.symlink_to("/etc/apt/trusted.gpg.d")
    return ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::Etc={apt / 'etc'}", "-o", f"Dir::State={apt / 'state'}",
            "-o", f"Dir::State::status={apt / 'state' / 'status'}", "-o", f"Dir::Cache={apt / 'cache'}"]


def write_cpuinfo(arm: ArmEnv, cpu: str) -> None:
    """An emulated root for ``cpu``: the Debian root plus an ARM ``/proc/cpuinfo``.

    qemu-user 7.2 passes the host's x86 /proc/cpuinfo through, and LiteRT's cpuinfo
    library dereferences a null pointer when it finds no ARM core in it (a segmentation
    fault in ``Interpreter()``). A real board has its own; qemu's ``-L`` prefix serves
    this one instead, with as many cores as /sys (the host's) lists.
    """
    variant, part, revision, features = CPUS[cpu]
    root = arm.cpu_root(cpu)
    (root / "proc").mkdir(parents=True, exist_ok=True)
    for entry in arm.root.iterdir():
        link = root / entry.name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(entry, root))
    cores = os.cpu_count() or 1
    (root / "proc" / "cpuinfo").write_text("".join(
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n"
        for n in range(cores)))


def build_wheel(folder: Path) -> Path:
    """capsedge's wheel from the working tree (pure Python), into ``folder``."""
    for old in folder.glob("capsedge-*.whl"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         str(REPO), "-w", str(folder)])
    (wheel,) = folder.glob("capsedge-*.whl")
    return wheel


def wheel_digest(wheel: Path) -> str:
    """A hash of a wheel's package files (names and contents; not timestamps nor the builder's)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if ".dist-info/" not in n):
            digest.update(name.encode() + b"\0" + archive.read(name))
    return digest.hexdigest()


def assemble(env: Path = DEFAULT_ENV) -> ArmEnv:
    """Assemble the arm64 environment in ``env`` (a minute or two; downloads about 65 MB)."""
    arm = ArmEnv(env)
    start = time.perf_counter()
    apt = private_apt(env)
    log("apt: arm64 Debian packages")
    run(["apt-get", *apt, "update", "-qq"])
    run(["apt-get", *apt, "install", "-y", "-qq", "--download-only", "--no-install-recommends",
         *DEBIAN_PACKAGES])
    shutil.rmtree(arm.root, ignore_errors=True)
    arm.root.mkdir(parents=True)
    debs = sorted((env / "apt" / "cache" / "archives").glob("*_arm64.deb")) + sorted(
        (env / "apt" / "cache" / "archives").glob("*_all.deb"))
    for deb in debs:
        run(["dpkg", "-x", str(deb), str(arm.root)])
    shutil.rmtree(env / "cpu", ignore_errors=True)
    for cpu in CPUS:
        write_cpuinfo(arm, cpu)

    log("pip: capsedge's wheel and the aarch64 wheels of its dependencies")
    arm.wheels.mkdir(exist_ok=True)
    wheel = build_wheel(arm.wheels)
    platforms = [option for tag in PLATFORMS for option in ("--platform", tag)]
    run([sys.executable, "-m", "pip", "download", "--quiet", *platforms, "--python-version", PYTHON,
         "--implementation", "cp", "--only-binary=:all:", "-d", str(arm.wheels),
         f"capsedge[{EXTRAS}] @ {wheel.as_uri()}"])

    log("venv: made and filled by the emulated Python")
    cpu = next(iter(CPUS))
    shutil.rmtree(arm.venv, ignore_errors=True)
    python = [find_qemu() or "qemu-aarch64", "-cpu", cpu, "-L", str(arm.cpu_root(cpu))]
    # --copies: a symlink to /usr/bin/python3.11 would resolve to the host's x86 binary;
    # --without-pip: ensurepip would exec an arm64 program, which needs binfmt_misc.
    run([*python, str(arm.root / "usr" / "bin" / f"python{PYTHON}"), "-m", "venv", "--copies",
         "--without-pip", str(arm.venv)])
    install(arm, wheel, cpu, dependencies=True)
    log(f"assembled in {time.perf_counter() - start:.0f} s: {env}")
    return arm


def install(arm: ArmEnv, wheel: Path, cpu: str, dependencies: bool) -> None:
    """pip (Debian's pip wheel, run as a zip) installs ``wheel`` into the venv, offline."""
    (pip_wheel,) = (arm.root / "usr" / "share" / "python-wheels").glob("pip-*.whl")
    target = f"capsedge[{EXTRAS}] @ {wheel.as_uri()}" if dependencies else str(wheel)
    extra = [] if dependencies else ["--no-deps", "--force-reinstall"]
    run([*arm.python(cpu), f"{pip_wheel}/pip", "install", "--quiet", "--no-index", "--find-links",
         str(arm.wheels), *extra, target])
    versions = run([*arm.python(cpu), "-c", VERSIONS]).stdout
    arm.ready.write_text(json.dumps({"capsedge_wheel_sha256": wheel_digest(wheel), **json.loads(versions)},
                                    indent=1) + "\n")


VERSIONS = """import json, platform, sys
from importlib.metadata import version
print(json.dumps({"python": platform.python_version(), "machine": platform.machine(), **{
    name: version(name) for name in ["capsedge", "numpy", "pillow", "ai-edge-litert", "pydicom",
                                     "starlette", "uvicorn"]}}))"""


def refresh(arm: ArmEnv) -> dict:
    """Reinstall capsedge in the venv if the working tree's wheel changed; the env's versions."""
    with tempfile.TemporaryDirectory() as folder:
        wheel = build_wheel(Path(folder))
        state = json.loads(arm.ready.read_text())
        if state.get("capsedge_wheel_sha256") != wheel_digest(wheel):
            log("capsedge changed: reinstalling it in the arm64 venv")
            shutil.copy(wheel, arm.wheels / wheel.name)
            install(arm, arm.wheels / wheel.name, next(iter(CPUS)), dependencies=False)
    return json.loads(arm.ready.read_text())


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="Where the environment is cached.")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="A folder of X-rays.")
    parser.add_argument("--count", type=int, default=4, help="How many X-rays (spread over makers).")
    parser.add_argument("--all", action="store_true", help="Every X-ray of --images.")
    parser.add_argument("--cpus", default=",".join(CPUS), help=f"Emulated CPUs, of {', '.join(CPUS)}.")
    parser.add_argument("--assemble-only", action="store_true", help="Assemble the environment, no check.")
    parser.add_argument("--rebuild", action="store_true", help="Assemble again even if cached.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here (JSON).")
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
    report = check(arm, pick_images(args.images, None if args.all else args.count), cpus)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    if report["mismatches"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
