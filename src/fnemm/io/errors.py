"""One exception type for every user-facing error, with the HTTP status it maps to.

The CLI prints ``str(error)`` as a single line (no traceback), so messages must
name the file at fault and say what to do about it. The service answers
``{"error": str(error)}`` with the class's ``status``; its messages must not reveal
server paths (the subclasses raised on requests are written that way).
"""


class FnemmError(Exception):
    """A problem with the user's input (files, options, a query) that they can fix."""
    status = 422


class NotFound(FnemmError):
    """No such thing (an image id, a file) where it was asked for."""
    status = 404


class Conflict(FnemmError):
    """The request is fine, but this gallery cannot answer it (no captions, no CNN)."""
    status = 409


class TooLarge(FnemmError):
    """Over a size limit (bytes, pixels)."""
    status = 413


class NotAnImage(FnemmError):
    """An upload or file that is not an image we can read."""
    status = 415


class NoMatch(FnemmError):
    """The query means nothing to the model (no word it knows): no answer rather than noise.
    The CLI exits 1 (as grep does when nothing matches); ``details`` names the words."""
    status = 422
    exit_code = 1

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details
