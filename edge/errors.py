"""The one exception family a user can cause; the CLI turns it into a one-line message."""


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


def missing_extra(module: str, extra: str) -> RuntimeMissingError:
    """Build the error for an optional dependency that is not installed."""
    return RuntimeMissingError(
        f"{module} is not installed; install it with: pip install 'capsedge[{extra}]'"
    )


def preview(value: object, limit: int = 60) -> str:
    """A short one-line ``repr`` of a value for a message (metadata can be long or span lines).

    Never used on image files' values: those are never quoted at all.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
