"""The arm64 environment of bench/arm64_check.py: Debian's arm64 Python and capsedge, under qemu.

Assembled from the package registries only, in ``.arm64/`` (ignored by git): Debian's arm64
Python 3.11 (``apt-get install --download-only`` with a private apt state, ``dpkg -x``), a root
per emulated CPU with that CPU's ``/proc/cpuinfo``, a virtual environment made by the emulated
Python, and capsedge installed into it by pip from a wheel built from the working tree plus the
aarch64 wheels of its dependencies (``pip download --platform manylinux_*_aarch64``).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENV = REPO / ".arm64"

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
