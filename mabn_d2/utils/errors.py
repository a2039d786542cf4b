"""One-line errors: the tools print `tool: error: <one line>` and exit 2 for inputs that cannot work."""

__all__ = ["UsageError", "first_line"]


def first_line(error: BaseException) -> str:
    """An error's first line (its type's name when it says nothing), for one-line messages."""
    text = (str(error).strip().strip("'\"").splitlines() or [""])[0]
    return text or type(error).__name__


class UsageError(ValueError):
    """An input that cannot work; the message is one line naming the key, path or device."""
