"""The project's error type for what a user can cause: a bad input or a refused action.

`UserError` says, in its message, what is wrong and how to fix it. The command line prints
such an error as one line and exits with code 1 (the traceback only at --verbosity=1); any
other exception is a bug and keeps its traceback. It derives from ValueError, which most of
these errors were before, so code that catches ValueError keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input or a refused action; the message names the problem and the fix."""
