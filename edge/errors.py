"""The one exception family a user can cause; the CLI turns it into a one-line message."""

import json
import struct


class CapsedgeError(Exception):
    """Base class for every error a user can cause (bad file, bad model, missing runtime)."""


class ImageError(CapsedgeError):
    """An input image is missing, unreadable, empty or not an image."""


class ModelError(CapsedgeError):
    """A model file is missing, corrupt, or its metadata does not match it."""


class UsageError(CapsedgeError, ValueError):
    """An argument or setting is out of range or inconsistent (also a ``ValueError``)."""


class RuntimeMissingError(CapsedgeError):
    """An optional runtime or extra is not installed."""


#: The pip extras of capsedge (setup.py ``extras_require``) that a message may name.
EXTRAS = ("serve", "dicom", "onnx", "train", "export", "dev")


def pip_install(extra: str) -> str:
    """The command that installs an extra: ``pip install 'capsedge[serve]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    return f"pip install 'capsedge[{extra}]'"


def missing_extra(package: str, extra: str, needed_by: str | None = None) -> RuntimeMissingError:
    """The error for an optional ``package`` that is not installed, in one line:
    ``"<needed_by> needs <package>: pip install 'capsedge[<extra>]'"``, or
    ``"<package> is not installed: ..."`` when ``needed_by`` is not given. The lazy imports go
    through :func:`capsedge.extras.require`, which raises it."""
    what = f"{needed_by} needs {package}" if needed_by else f"{package} is not installed"
    return RuntimeMissingError(f"{what}: {pip_install(extra)}")


def preview(value: object, limit: int = 60) -> str:
    """A short one-line ``repr`` of a value for a message (metadata can be long or span lines).

    Never used on image files' values: those are never quoted at all.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(exc: BaseException) -> str:
    """Why reading or writing failed, in a few words for a one-line message.

    The system's reason for an ``OSError``, else a phrase for the kind of failure. Never the
    exception's class name (``(RuntimeError)`` tells a user nothing), and never its message: a
    decoder's can quote the file's bytes, a DICOM header's patient data.
    """
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file or folder"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON at line {exc.lineno}"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and len(exc.args[0]) <= 40:
        return f"no {exc.args[0]!r} entry"
    if isinstance(exc, (EOFError, struct.error)):
        return "the data ends too early"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return "corrupt or unsupported data"
