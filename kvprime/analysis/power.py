"""Power of the paired tests: the minimum detectable effect at a run's n, and the n a planned run needs.

All of it is statsmodels' noncentral-t power of the one-sample (paired) t-test, ``TTestPower``, in standardised
units (effect / sd of the per-sample deltas), converted back to nats with the observed paired sd:

* **MDE** (minimum detectable effect): the smallest |mean delta| the two-sided paired t-test at level ``alpha``
  detects with probability ``power`` at the run's n: ``TTestPower().solve_power(nobs=n)`` times sd. It is given
  at the unadjusted alpha; Holm's adjustment only makes the effect a run can see larger.
* **n to detect** an effect e: ``TTestPower().solve_power(effect_size=e / sd)``, two-sided, rounded up.
* **n to show equivalence** within +-margin when the true difference is 0: the TOST rejects both one-sided
  nulls, each at level alpha; the standard sample-size formula for a zero true difference (Chow, Shao & Wang,
  *Sample Size Calculations in Clinical Research*, 2nd ed., sec. 3.2) is the one-sided t-test's n for effect
  margin / sd at power 1 - (1 - power) / 2, which is what is solved here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from statsmodels.stats.power import TTestPower

_NAN = float("nan")


def _solve(**kw) -> float:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # convergence chatter; a failed solve is returned as NaN
        try:
            value = TTestPower().solve_power(**kw)
        except (ValueError, RuntimeError, ZeroDivisionError):
            return _NAN
    value = float(np.asarray(value).ravel()[0])
    return value if math.isfinite(value) else _NAN


def mde(sd: float, n: int, *, alpha: float, power: float) -> float:
    """The minimum detectable |mean delta| in nats (NaN when n < 2 or sd is not finite; 0 when sd is 0)."""
    if n < 2 or not math.isfinite(sd):
        return _NAN
    if sd == 0:
        return 0.0  # constant deltas: any non-zero mean is detected
    d = _solve(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return d * sd


def n_to_detect(sd: float, effect: float, *, alpha: float, power: float) -> float:
    """Samples the two-sided paired t-test needs to detect a mean delta of ``effect`` nats (ceil; NaN if unknown)."""
    if not (math.isfinite(sd) and sd > 0 and effect != 0):
        return _NAN
    n = _solve(effect_size=abs(effect) / sd, nobs=None, alpha=alpha, power=power, alternative="two-sided")
    return float(math.ceil(n)) if math.isfinite(n) else _NAN


def n_for_equivalence(sd: float, margin: float, *, alpha: float, power: float) -> float:
    """Samples the TOST needs to show equivalence within +-``margin`` nats when the true mean delta is 0."""
    if not (math.isfinite(sd) and sd > 0 and margin > 0):
        return _NAN
    n = _solve(effect_size=margin / sd, nobs=None, alpha=alpha, power=1 - (1 - power) / 2, alternative="larger")
    return float(math.ceil(n)) if math.isfinite(n) else _NAN
