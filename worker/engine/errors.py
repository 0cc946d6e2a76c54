"""The engine's one user-facing error type.

`InputError`: the job's inputs cannot run on this model (a component out of range, too few prompts to resample,
a prompt longer than the sliding window, an answer that tokenises to nothing). Its message is the job's error,
as is. Every other exception out of the engine is a bug: the worker logs it with its traceback and reports an
internal error (worker/tasks.py).
"""

from __future__ import annotations


class InputError(ValueError):
    """The job's inputs cannot run on this model; the message says why, for the user."""
