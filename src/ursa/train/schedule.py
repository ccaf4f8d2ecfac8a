"""Learning-rate schedules as plain functions: one-cycle (cosine warm-up and annealing) and the lr_find sweep.

Follows the one-cycle policy: warm up from lr_max/div to lr_max over `pct_start` of the steps, then
anneal to lr_max/div_final, with momentum (Adam's beta1) moving the opposite way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["cos_anneal", "one_cycle", "apply_one_cycle", "lr_range", "smooth", "suggest_lr", "SuggestedLRs", "LRSuggestion", "split_lrs"]


def cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from `start` (pct=0) to `end` (pct=1)."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def one_cycle(step: int, total: int, lr_max: float, *, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5, moms: tuple[float, float, float] = (0.95, 0.85, 0.95)) -> tuple[float, float]:
    """(learning rate, momentum) at `step` of `total` (0-based)."""
    pct = step / max(1, total - 1)
    if pct <= pct_start:
        p = pct / pct_start if pct_start > 0 else 1.0
        return cos_anneal(lr_max / div, lr_max, p), cos_anneal(moms[0], moms[1], p)
    p = (pct - pct_start) / (1 - pct_start)
    return cos_anneal(lr_max, lr_max / div_final, p), cos_anneal(moms[1], moms[2], p)


def apply_one_cycle(opt: Any, step: int, total: int, peaks: Sequence[float], **kw: Any) -> None:
    """Set the learning rate and Adam's beta1 of each parameter group of `opt` (a torch optimizer) to their
    one-cycle values at `step` of `total`; `peaks[i]` is group i's lr_max, `kw` go to `one_cycle`."""
    for pg, peak in zip(opt.param_groups, peaks):
        lr, mom = one_cycle(step, total, peak, **kw)
        pg["lr"], pg["betas"] = lr, (mom, pg["betas"][1])


def lr_range(start_lr: float, end_lr: float, num_it: int) -> np.ndarray:
    """`num_it` learning rates spaced exponentially from `start_lr` to `end_lr`."""
    return np.geomspace(start_lr, end_lr, num_it)


def smooth(values: Sequence[float], beta: float = 0.98) -> np.ndarray:
    """Debiased exponential moving average (the lr_find loss curve)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta**i))
    return np.array(out)


class SuggestedLRs(NamedTuple):
    """Suggested learning rates from an lr_find sweep (fastai's name; `lr_find` returns one)."""

    valley: float  # inside the longest stretch where the loss keeps falling (the default suggestion)
    minimum: float  # a tenth of the learning rate with the lowest loss
    steep: float  # where the loss falls fastest


LRSuggestion = SuggestedLRs  # the earlier name


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> SuggestedLRs:
    """Pick learning rates from a smoothed sweep; `lrs` and `losses` have the same length (>= 4)."""
    lrs_a, l = np.asarray(lrs, float), np.asarray(losses, float)
    n = len(l)
    # valley: longest decreasing subsequence, then a point two thirds of the way down it
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if l[i] < l[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    valley = lrs_a[min(n - 1, max_start + int(sections) + int(sections / 2))]
    grads = np.gradient(l, np.log10(lrs_a))
    steep = lrs_a[int(np.argmin(grads[1:-1])) + 1] if n > 2 else lrs_a[0]
    minimum = lrs_a[int(np.argmin(l))] / 10
    return SuggestedLRs(valley=float(valley), minimum=float(minimum), steep=float(steep))


def split_lrs(lr: float | slice, n_groups: int) -> list[float]:
    """Discriminative learning rates: `slice(lo, hi)` spreads geometrically over `n_groups` groups
    (first = body, last = head); `slice(None, hi)` gives hi/10 to all but the last; a float gives all the same."""
    if isinstance(lr, slice):
        lo, hi = lr.start, lr.stop
        if lo is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        if n_groups == 1:
            return [hi]
        return list(np.geomspace(lo, hi, n_groups))
    return [float(lr)] * n_groups
