"""How a command's failure reaches the terminal: kvprime's own refusal (a ``KvprimeError``, also when a
library wrapped it) and a mistake on the Hydra command line as one paragraph (exit 2); anything else as an
internal error with the traceback saved to a file (exit 1). ``KVPRIME_DEBUG=1`` re-raises instead."""

from __future__ import annotations

import re
import sys

from ..errors import KvprimeError, debug, explain, explain_internal, save_traceback

# Hydra's refusal of an override whose key the composed config lacks, with its hint to add it with "+".
_NO_SUCH_KEY = re.compile(r"Could not override '([^']+)'\.\s*To append to your config use \+[^=\s]+=(.*)")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def report_failure(err: BaseException) -> int:
    """Print the paragraph for ``err`` and return the exit status (re-raises under KVPRIME_DEBUG=1)."""
    if isinstance(err, KeyboardInterrupt):
        _say("kvprime: interrupted.")
        return 130
    if isinstance(err, SystemExit):
        raise err
    mine = _kvprime_cause(err)
    if mine is not None:
        if debug():
            raise err
        _say(explain(mine))
        return mine.exit_code
    hydra_msg = _hydra_user_error(err)
    if hydra_msg is not None:
        if debug():
            raise err
        _say("kvprime: error: " + hydra_msg.replace("\n", "\n  "))
        return 2
    if debug():
        raise err
    _say(explain_internal(err, save_traceback(err)))
    return 1


def _config_errors() -> tuple[type, type]:
    """The base classes of Hydra's and OmegaConf's errors (composition, overrides, resolvers)."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException


def _kvprime_cause(err: BaseException | None):
    """The KvprimeError behind ``err`` (OmegaConf wraps a resolver's error, e.g. an unwritable run directory)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KvprimeError):
            return err
        seen.add(id(err))
        # Only through the wrappers of Hydra and OmegaConf: a bug raised while handling a refusal is a bug.
        if not isinstance(err, _config_errors()):
            return None
        err = err.__cause__ or err.__context__
    return None


def _hydra_user_error(err: BaseException) -> str | None:
    """The message of a composition or override error (the user's command line), else None."""
    if not isinstance(err, _config_errors()):
        return None
    if (mine := _setting_paragraph(err)) is not None:  # a typed setting's own paragraph (kvprime.config.schema)
        return mine
    text = str(err).strip().split("\nConfig search path:")[0].strip()
    missing = _NO_SUCH_KEY.match(text)
    if missing:  # Hydra's hint (+key=...) would only meet kvprime's refusal of keys it does not read
        value = (missing.group(2).splitlines() or [""])[0].strip()
        mine = _not_in_config(missing.group(1), value)
        if mine is not None:
            return mine
    cause = err.__cause__
    if isinstance(cause, _config_errors()[1]) and str(cause).strip() not in text:
        text += "\n" + str(cause).strip()
    return text


def _setting_paragraph(err: BaseException) -> str | None:
    """kvprime's paragraph for a value or key Hydra or OmegaConf refused while composing (None: not a setting's)."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..config import compose
    from ..data import OPTIONS

    return compose.user_error(err, OPTIONS)


def _not_in_config(key: str, value: str) -> str | None:
    """kvprime's paragraph for an override of a key the composed config lacks (None: not one kvprime refuses)."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..config import compose, settings
    from ..data import OPTIONS

    return compose.not_in_config(key, value, settings.declared(), OPTIONS)
