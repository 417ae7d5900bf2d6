"""An experiment's named comparisons, read from its config: which of them a run (or its report) holds.

Config interpretation with no model and no run behind it, so ``kvprime report`` reads a run directory's
comparisons as the run planned them.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import RunError


def comparisons_for(exp: Mapping, defined: Mapping, names) -> list[dict]:
    """Named comparisons whose two conditions are in this run (``condition=<name>`` runs fewer)."""
    out = []
    for comp in exp.get("comparisons") or []:
        for key in ("treatment", "reference"):
            if comp[key] not in defined and comp[key] not in names:
                raise RunError(f"experiment {exp['name']!r}: comparison {comp['name']!r} names {key} "
                               f"{comp[key]!r}, which is not one of its conditions ({', '.join(defined)}).")
        if comp["treatment"] in names and comp["reference"] in names:
            out.append({k: comp[k] for k in ("name", "treatment", "reference")})
    return out
