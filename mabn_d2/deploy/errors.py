"""The one error type of deployment: bad user input or a failed check, named in the message."""


class ExportError(RuntimeError):
    """A problem with the user's inputs or a failed check; the message says which file or key."""
