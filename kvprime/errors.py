"""How a user's mistake is shown: one paragraph naming the bad value, no traceback.

kvprime's checks raise ValueError/RuntimeError/FileNotFoundError with messages written for users (bad names,
templates, missing GPU, unreachable hub). ``KVPRIME_DEBUG=1`` re-raises them with the traceback.
"""

from __future__ import annotations

import os
import textwrap

USER_ERRORS = (ValueError, RuntimeError, FileNotFoundError)


def debug() -> bool:
    return os.environ.get("KVPRIME_DEBUG", "") not in ("", "0")


def explain(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return "kvprime: error: " + "\n".join(textwrap.wrap(text, 100, subsequent_indent="  ")) + \
        "\n  (KVPRIME_DEBUG=1 shows the traceback)"
