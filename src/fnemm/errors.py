"""fnemm's errors, where users import them from (``from fnemm.errors import FnemmError``);
they live in fnemm.io.errors."""

from fnemm.io.errors import Conflict, FnemmError, NoMatch, NotAnImage, NotFound, TooLarge

__all__ = ["Conflict", "FnemmError", "NoMatch", "NotAnImage", "NotFound", "TooLarge"]
