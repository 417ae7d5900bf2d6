"""kvprime: does priming a document's KV cache with a surrogate query make the right answer more likely?

The package import is light (no torch); ``Engine`` and friends load on first use.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("kvprime.builders.engine", "Engine"),
    "ConditionSpec": ("kvprime.builders.conditions", "ConditionSpec"),
    "PrimedCache": ("kvprime.builders", "PrimedCache"),
    "BUILDERS": ("kvprime.builders", "BUILDERS"),
    "register_builder": ("kvprime.builders", "register_builder"),
    "load_samples": ("kvprime.data", "load_samples"),
    "run_experiment": ("kvprime.pipeline.runner", "run_experiment"),
    "Session": ("kvprime.pipeline.session", "Session"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvprime' has no attribute {name!r}")
