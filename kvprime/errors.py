"""How failures reach the user: kvprime's own checks as one paragraph (exit 2), anything else as an internal
error whose traceback is saved to a file (exit 1).

Every check kvprime makes on settings, data, paths and run directories raises a ``KvprimeError`` subclass
with a message written for the user (the setting, the value, what is accepted). Anything else (out of
memory, a library failure, a bug) is not the user's mistake and must not look like one: it is reported as
internal, with the traceback kept in a file. ``KVPRIME_DEBUG=1`` shows tracebacks of both kinds.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import textwrap
import traceback
from pathlib import Path


class KvprimeError(Exception):
    """A problem with the user's settings, data, paths or run directory, explained in the message."""

    exit_code = 2


class ConfigError(KvprimeError, ValueError):
    """A setting's value is not accepted (the message names the setting, the value and what is accepted)."""


class DataError(KvprimeError, ValueError):
    """Input data that cannot be used as given."""


class MissingFileError(KvprimeError, FileNotFoundError):
    """A file or directory the user named (or a run needs) is not there."""


class UnavailableError(KvprimeError, RuntimeError):
    """Something the settings ask for is not available on this machine (a GPU, the hub, a model folder)."""


class RunDirError(KvprimeError):
    """A run directory cannot be used: held by another writer, holding another run, or not writable."""


class RunError(ConfigError):
    """A configuration or run-directory problem, reported before any work is lost."""


class ModelUnavailable(UnavailableError):
    """The model cannot be used on this machine, with the reason and what to do instead."""


class Interrupted(KvprimeError):
    """SIGINT/SIGTERM stopped a run at a record boundary; the run directory is resumable."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


USER_ERRORS = (KvprimeError,)


def debug() -> bool:
    return os.environ.get("KVPRIME_DEBUG", "") not in ("", "0")


def _wrap(text: str) -> str:
    # Paths and commands stay whole (no breaks at hyphens or inside long words), so they can be copied.
    return "\n".join(textwrap.wrap(" ".join(text.split()), 100, subsequent_indent="  ", break_on_hyphens=False,
                                    break_long_words=False))


def explain(err: BaseException) -> str:
    """One paragraph for a ``KvprimeError``."""
    if isinstance(err, Interrupted):
        return "kvprime: " + _wrap(str(err))
    text = str(err) or type(err).__name__
    return "kvprime: error: " + _wrap(text) + "\n  (KVPRIME_DEBUG=1 shows the traceback)"


def traceback_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def save_traceback(err: BaseException, where: Path | None = None) -> Path:
    """Write the traceback to ``where`` (a file), else to $KVPRIME_HOME/errors/, else the temp directory."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    candidates = [where] if where is not None else []
    home = os.environ.get("KVPRIME_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "kvprime")
    candidates += [Path(home) / "errors" / f"{stamp}-{os.getpid()}.txt",
                   Path(tempfile.gettempdir()) / f"kvprime-error-{stamp}-{os.getpid()}.txt"]
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback_text(err))
            return path
        except OSError:
            continue
    return Path("<nowhere: no writable place for the traceback>")


def explain_internal(err: BaseException, saved: Path | str) -> str:
    """The paragraph for an error that is not the user's: what it was, that it is internal, where to look."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return ("kvprime: internal error: " + _wrap(
        f"{type(err).__name__}: {first}. This is not a problem with your settings or data that kvprime checked "
        f"for (out of memory, a library failure or a bug in kvprime). The full traceback was saved to {saved}; "
        "KVPRIME_DEBUG=1 shows it on the terminal."))
