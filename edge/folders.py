"""Finding images in folders: which files count as images, the walk that skips what it cannot
read, and the label a file's name gives. Used by classify, training, export and benches."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import reason

#: File name suffixes taken as images when a folder is read (by classify, training, export).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom"}
)


def is_image_file(path: Path, *, allow_no_suffix: bool = False) -> bool:
    """Whether a folder entry is taken as an image: a known suffix (or, if allowed, none, as
    DICOM exports often have), not hidden, a regular file."""
    if path.name.startswith("."):
        return False
    named = path.suffix.lower() in IMAGE_SUFFIXES or (allow_no_suffix and not path.suffix)
    return named and path.is_file()


def label_from_name(path: str | os.PathLike) -> str:
    """The label a file's name gives in the public archive's flat layout: the first
    dot-separated token (``Depuy.7.jpg`` -> ``Depuy``). The one statement of that rule."""
    return Path(path).name.split(".")[0]


def image_files(folder: str | Path, *, allow_no_suffix: bool = False) -> list[Path]:
    """The images under ``folder``, at any depth, sorted; hidden files and folders are skipped,
    and so are folders that cannot be read (:func:`walk_images` says which)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return walk_images(root, allow_no_suffix=allow_no_suffix)[0]


def walk_images(folder: str | Path, *, allow_no_suffix: bool = False
                ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images under ``folder`` (as :func:`image_files`), and each folder or entry that
    could not be read with the reason; the walk goes on past them.

    Symbolic links to folders are not followed (no loops); links to files are taken.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError as exc:
            problems.append((current, f"cannot read folder ({reason(exc)})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif is_image_file(path, allow_no_suffix=allow_no_suffix):
                    files.append(path)
            except OSError as exc:  # an entry of a folder we may list but not enter
                problems.append((path, f"cannot read ({reason(exc)})"))
    return sorted(files), sorted(problems)


