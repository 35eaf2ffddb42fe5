"""What every strategy grammar of the selectors shares: its error type, close-match hints and
the predictions columns that may be named as a score (derived from the table's schema)."""

from __future__ import annotations

import difflib
from typing import Final

from detloop.data import schema


class StrategyError(ValueError):
    """A strategy name that does not parse; the message names the token, position and fixes."""


#: Predictions columns that may be named as a score directly (list columns are averaged).
COLUMN_SCORES: Final = tuple(
    name
    for name in (
        *schema.PREDICTIONS.schema.names,
        *(f.name for f in schema.PREDICTIONS.optional),
    )
    if name not in ("image_id", "det_id", "class_id", "cons_cls")
)


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'a', 'b'?)`` for close matches of ``word``, else an empty string."""
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
