"""Exceptions raised by edgemoe, and the mapping from native status codes to them."""

from __future__ import annotations

import click


class EdgemoeError(Exception):
    """Base of every error edgemoe raises on purpose. Its message is one line for users."""


class CliError(click.ClickException):
    """A user-facing failure of a command: one `edgemoe: error: ...` line on stderr, exit code 1."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line

    def show(self, file=None) -> None:
        click.echo(f"edgemoe: error: {self.message}", err=True)


class NativeLibraryError(EdgemoeError):
    """The shared libraries are missing or cannot be loaded."""


class InvalidArgumentError(EdgemoeError, ValueError):
    """An option or argument is out of range or malformed."""


class ChatTemplateError(InvalidArgumentError):
    """A chat template does not compile, refused the chat (its raise_exception) or failed rendering."""


class BudgetParseError(InvalidArgumentError):
    """A budget string (`800MiB`, `25%`, `off`) could not be parsed."""


class BudgetTooSmallError(InvalidArgumentError):
    """The expert-cache budget is below what one token needs; the message names the minimum."""


class ModelFormatError(EdgemoeError):
    """The file is not a GGUF, is truncated, or has a layout edgemoe cannot use."""


class ModelLoadError(EdgemoeError):
    """llama.cpp refused to load the model or create a context."""


class EdgemoeIOError(EdgemoeError, OSError):
    """Opening or reading a file failed."""


class NoExpertsError(EdgemoeError):
    """The model has no routed expert tensors (a dense model)."""


class OutOfMemoryError(EdgemoeError, MemoryError):
    pass


class ConvertError(EdgemoeError):
    """A conversion cannot be done: unsupported architecture, missing shard, bad router, ..."""


class RouterFormatError(ConvertError):
    """A router file or a model's `edgemoe.router.*` data does not follow docs/router-format.md."""


class StateError(EdgemoeError):
    """A call that is not valid in the current state (e.g. after close())."""


class DecodeError(EdgemoeError):
    """llama_decode failed."""


class ContextFullError(DecodeError):
    """The tokens do not fit in the remaining context."""


class QueueFullError(EdgemoeError):
    """Too many requests already wait for a sequence; retry_after: seconds to wait before trying again."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = int(retry_after)


# enum edgemoe_status -> exception class (EDGEMOE_OK == 0 raises nothing)
_STATUS_ERRORS = {
    1: InvalidArgumentError,  # EDGEMOE_ERR_INVALID_ARG
    2: EdgemoeIOError,        # EDGEMOE_ERR_IO
    3: ModelFormatError,      # EDGEMOE_ERR_FORMAT
    4: BudgetTooSmallError,   # EDGEMOE_ERR_BUDGET
    5: NoExpertsError,        # EDGEMOE_ERR_NO_EXPERTS
    6: OutOfMemoryError,      # EDGEMOE_ERR_NOMEM
    7: StateError,            # EDGEMOE_ERR_STATE
}


def error_for_status(status: int, message: str) -> EdgemoeError:
    """The exception for a non-zero native status, carrying the native last-error message."""
    cls = _STATUS_ERRORS.get(status, EdgemoeError)
    err = cls(message or f"native error (status {status})")
    err.status = status
    return err
