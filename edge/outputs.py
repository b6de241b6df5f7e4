"""No output path of any command overwrites one of its inputs (README, "Reliability").

An output is compared with the inputs as files (device and inode), so another spelling,
a symbolic link or a hard link to an input is recognised too; an output folder may not be
an input folder or lie inside one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .boundary import printable
from .errors import UsageError

PathLike = str | os.PathLike


def _identity(path: PathLike) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def same_file(target: PathLike, paths: Iterable[PathLike]) -> bool:
    """Whether ``target`` exists and is one of ``paths`` (links and other spellings included)."""
    wanted = _identity(target)
    return wanted is not None and any(_identity(path) == wanted for path in paths)


def refuse_overwrite(output: PathLike, inputs: Iterable[PathLike], option: str) -> None:
    """Refuse an output file that is one of the inputs.

    Raises:
        UsageError: ``output`` is one of ``inputs``.
    """
    if same_file(output, inputs):
        raise UsageError(f"{option} {printable(os.fspath(output))} is one of the inputs or the model; "
                         "refusing to overwrite it")


def refuse_inside(folder: PathLike, inputs: Iterable[PathLike | None], option: str) -> None:
    """Refuse an output folder that is an input, or lies inside an input folder.

    Raises:
        UsageError: ``folder`` is, or lies inside, one of ``inputs``.
    """
    out = Path(folder).absolute()
    # The folder or its nearest existing parent: where the files would land.
    existing = next((p for p in (out, *out.parents) if _identity(p) is not None), None)
    if existing is None:
        return
    resolved = existing.resolve()
    around = {_identity(p) for p in (resolved, *resolved.parents)}
    for path in inputs:
        identity = _identity(path) if path is not None else None
        if identity is None:
            continue
        if identity == _identity(out) or (Path(path).is_dir() and identity in around):
            raise UsageError(f"{option} {printable(os.fspath(folder))} is, or lies inside, one of the "
                             "inputs; refusing to write there")
