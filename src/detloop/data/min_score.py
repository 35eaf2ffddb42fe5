"""The consumer score floor (ALGORITHMS §3): which detections of a predictions table count.

Selection, thresholding, auto-labeling, review exports and renderings keep only detections with
``score > min_score``. Its value is decided here, once: the first configured value, else the
mean score of the validation detections matched to a ground-truth box floored to one decimal,
else ``DEFAULT_MIN_SCORE``. It lives in ``data`` (not ``selectors``) because the review exports
of ``data`` need the fallback too; callers pass the values, this module reads no config.
"""

from __future__ import annotations

import math

#: min_score when neither the config nor a validation run gives one (§3).
DEFAULT_MIN_SCORE = 0.4


def resolve_min_score(*configured: float | None, mean_matched: float | None = None) -> float:
    """The score floor.

    Args:
        configured: configured values in order of precedence (e.g. ``al.min_score``,
            ``predict.min_score``); the first that is not None wins.
        mean_matched: the mean score of the matched validation detections, when known.

    Returns:
        The first configured value; else ``mean_matched`` floored to one decimal when it is
        finite; else ``DEFAULT_MIN_SCORE``.
    """
    for value in configured:
        if value is not None:
            return float(value)
    if mean_matched is None or not math.isfinite(mean_matched):
        return DEFAULT_MIN_SCORE
    return math.floor(mean_matched * 10 + 1e-9) / 10
