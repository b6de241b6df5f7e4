"""A ``.tflite`` file is checked before LiteRT touches it in this process.

LiteRT trusts the flatbuffer: one changed byte in a model (7 of 2,000 one-byte mutants of
0.9.0's bundled file, ``bench/model_fuzz.py``) can make ``allocate_tensors`` abort the whole
process ("double free or corruption", exit 134, nothing on stderr). So:

- the bundled model must match the SHA-256 shipped beside it (``assets/default.sha256``);
  a mismatch is a ``ModelError`` ("reinstall capsedge") and LiteRT never opens it;
- any other file is first loaded, allocated and run once on zeros in a child process; if
  that child dies of a signal (or hangs), the file is a ``ModelError``. A file that passes
  is remembered by its digest, so a server loading several copies pays once (about 0.3 s).

Errors the runtime reports normally are left to the in-process load, which words them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

from . import bundled
from .errors import ModelError

#: How a trial child ended (:func:`trial`).
TrialOutcome = Literal["runs", "error", "crash", "hang"]

#: Seconds the child may take to load and run the model once.
TRIAL_TIMEOUT = 120.0

#: The child: LiteRT (else tflite_runtime) loads, allocates and runs the file once; no core file.
_TRIAL = """
import sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
except (ImportError, ValueError, OSError):
    pass
import numpy as np
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
"""

_verified: set[str] = set()
_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_tflite(path: Path) -> None:
    """Make sure loading ``path`` in this process cannot bring the process down.

    Raises:
        ModelError: the bundled model is corrupt, or the runtime crashed or hung on the file.
    """
    digest = file_digest(path)
    expected = bundled.bundled_digest()
    if digest == expected or digest in _verified:
        return
    if expected and _same(path, bundled.default_model_path()):
        raise ModelError("the bundled model file is corrupt (checksum mismatch); reinstall capsedge")
    with _lock:
        if digest in _verified:
            return
        if not sys.executable:  # an embedded interpreter: no child to try it in
            return
        outcome = trial(path)
        if outcome == "hang":
            raise ModelError(f"not a usable TFLite model (the runtime did not load it within "
                             f"{TRIAL_TIMEOUT:g} s)")
        if outcome == "crash":
            raise ModelError("not a valid TFLite model (the runtime crashed loading it: corrupt file)")
        if outcome == "runs":
            _verified.add(digest)


def trial(path: Path, timeout: float = TRIAL_TIMEOUT) -> TrialOutcome | None:
    """Load, allocate and run ``path`` once in a child process; how the child ended: ``"runs"``,
    ``"error"`` (the runtime raised an error, which the in-process load words), ``"crash"`` (a
    signal or an abort) or ``"hang"`` (past ``timeout`` seconds); None when no child started."""
    try:
        done = subprocess.run([sys.executable, "-c", _TRIAL, str(path)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return "hang"
    except OSError:
        return None
    if done.returncode == 0:
        return "runs"
    return "error" if done.returncode == 1 else "crash"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
