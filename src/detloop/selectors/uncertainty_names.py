"""Names of the uncertainties that thresholding (ALGORITHMS §7.2) and auto-labeling (§8)
combine, and the ``ENTALBOX`` token grammar. Dependency-free, so the config can validate
``thresholding.thr_sel_uncert`` without importing pandas."""

from __future__ import annotations

import difflib

# The reference's four, plus ``score_gap`` = 1 − score (detloop extension, token ``SCORE``): the
# detector's own doubt that the box is an object at all, which none of the four measures.
UNCERTAINTIES = ("entropy", "albox_rel", "mcbox_rel", "mc_class", "score_gap")
ALIASES = {
    "ENT": "entropy",
    "ALBOX": "albox_rel",
    "MCBOX": "mcbox_rel",
    "MCCLS": "mc_class",
    "SCORE": "score_gap",
}


def parse_uncertainties(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``ENTALBOX`` (alias tokens, longest match) or a list of registered names."""
    if isinstance(spec, str) and spec in UNCERTAINTIES:
        return [spec]
    if not isinstance(spec, str):
        names = list(spec)
        bad = [n for n in names if n not in UNCERTAINTIES]
        if bad:
            close = difflib.get_close_matches(bad[0], UNCERTAINTIES, n=2)
            raise ValueError(f"unknown uncertainty {bad[0]!r}; one of {UNCERTAINTIES} ({close})")
        return names
    out, pos = [], 0
    while pos < len(spec):
        hit = max((a for a in ALIASES if spec.startswith(a, pos)), key=len, default=None)
        if hit is None:
            raise ValueError(
                f"thr_sel_uncert {spec!r}: unknown token at position {pos} ({spec[pos:]!r}); "
                f"tokens are {', '.join(ALIASES)}, e.g. ENTALBOX"
            )
        out.append(ALIASES[hit])
        pos += len(hit)
    return out
