"""Where messages go: kvprime's own lines (``logging``, logger ``kvprime``) to the terminal and the run's
``run.log``, which is the job's log (Hydra's own job log file is switched off: conf/hydra/job_logging); progress
bars to the terminal only; libraries' warnings
(transformers, datasets, Python ``warnings``) to ``run.log`` only, unless ``KVPRIME_DEBUG=1``.

A library's deprecation notice is useful in a log a developer reads after the fact and noise on a
researcher's terminal; kvprime's own calls raise none (tested), so what remains is the libraries' business.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import debug

RUN_LOG = "run.log"
LIBRARIES = ("py.warnings", "transformers", "datasets", "sentence_transformers", "huggingface_hub", "accelerate",
             "torch", "urllib3", "filelock")
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_state: dict = {"handler": None}


class _DebugHandler(logging.StreamHandler):
    """The terminal handler debug mode adds to a library's logger (a class of its own: added once, found again)."""


def quiet_libraries() -> None:
    """Route warnings and library log records away from the terminal (to the run log, once there is one)."""
    logging.captureWarnings(True)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.propagate = False
        if debug() and not any(isinstance(h, _DebugHandler) for h in logger.handlers):
            logger.addHandler(_DebugHandler(sys.stderr))
    if "transformers" in sys.modules:
        _transformers_off_terminal()


def _transformers_off_terminal() -> None:
    from transformers.utils import logging as tlog  # lazy: torch; called once something else imported it

    tlog.disable_default_handler()  # its own stderr handler; records still reach the handlers added here


def attach_run_log(run_dir: Path) -> None:
    """Append this process's log records (kvprime's and the libraries') to ``<run_dir>/run.log``."""
    detach_run_log()
    quiet_libraries()
    handler = logging.FileHandler(Path(run_dir) / RUN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    for name in ("", "kvprime.summary", *LIBRARIES):
        logging.getLogger(name).addHandler(handler)
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _state["handler"] = handler


def detach_run_log() -> None:
    handler = _state["handler"]
    if handler is None:
        return
    for name in ("", "kvprime.summary", *LIBRARIES):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
    _state["handler"] = None
