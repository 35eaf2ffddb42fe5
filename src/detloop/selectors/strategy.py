"""Active-learning strategy names, parsed once into a typed ``StrategySpec`` (ALGORITHMS §9.2).

A strategy is written as in the reference, modifiers stacked left of the score::

    perc_calib_norm_bottomk_mean_albox    prune_rand_random    highep_lowal_alluncert

Modifier tokens are matched exactly and by longest match from the left (``full_prune`` before
``prune``, ``highep_lowal`` as one token); whatever remains is the score, which must be a
registered score or a predictions column. Nothing downstream looks at the string again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from detloop.selectors.scores import ScoreInfo, get_score, registered_scores
from detloop.selectors.stages import registered_orderings
from detloop.selectors.vocabulary import COLUMN_SCORES, StrategyError, did_you_mean

Prune = Literal["none", "prune", "full_prune"]
Aggregation = Literal["max", "mean"]
Ordering = Literal["topk", "bottomk", "nee"]

#: Modifier tokens with a one-line description each (``detloop strategies`` prints them).
MODIFIERS: Final = {
    "prune": "prune near-duplicate pool images before the loop, rescale the budgets (§9.5)",
    "full_prune": "prune the pool, then train once on everything that is left (§9.5)",
    "rand": "with prune/full_prune: prune randomly, keeping (1 - prune_thr) of the pool",
    "perc": "class balancing: weight image scores by inverse predicted class frequency",
    "calib": "use the calibrated *_cal columns",
    "norm": "box stds relative to the predicted box size (albox, mcbox)",
    "box": "marks a localisation score; accepted and ignored (albox/mcbox say it already)",
    "bottomk": "select the lowest scores instead of the highest",
    "nee": "balance exploration and exploitation over 5 score bins (Roy et al. 2018)",
    "mean": "aggregate detections per image with the mean instead of the max",
    "highep_lowal": "fuse alluncert as (mcbox + mcclass) - albox after min-max scaling",
}

#: Tokens that belong to other settings, with where they go instead.
FOREIGN_TOKENS: Final = {
    "baseline": "a training setup: set model.uncertainty: baseline",
    "lossatt": "a training setup: set model.uncertainty: lossatt",
    "pseudoscore": "an SSL selection option: use it in ssl.selection_strategy",
    "selftrain": "an SSL selection option: use it in ssl.selection_strategy",
    "all_uncert": "the SSL spelling; the AL score is alluncert",
}

_ORDER: Final = ("prune", "full_prune", "rand", "perc", "calib", "norm", "box", "bottomk", "nee")
_ORDER_TAIL: Final = ("mean", "highep_lowal")


def _vocab() -> list[str]:
    """Every word of the grammar, shortest first (registered scores as registered now)."""
    return sorted({*MODIFIERS, *registered_scores(), *COLUMN_SCORES, *FOREIGN_TOKENS}, key=len)


@dataclass(frozen=True)
class StrategySpec:
    """A parsed active-learning strategy.

    Attributes:
        score: registered score name (``registered_scores()``) or a predictions column.
        prune: redundancy pruning before the loop: ``none``, ``prune`` or ``full_prune``.
        prune_random: prune randomly instead of by perceptual hash (``rand``).
        perc: class-balancing weights.
        calib: use calibrated ``*_cal`` columns.
        norm: box stds relative to the box size.
        aggregation: per-image reduction of detection scores.
        ordering: ``topk`` (highest first), ``bottomk`` or ``nee``.
    """

    score: str
    prune: Prune = "none"
    prune_random: bool = False
    perc: bool = False
    calib: bool = False
    norm: bool = False
    aggregation: Aggregation = "max"
    ordering: Ordering = "topk"

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise StrategyError("; ".join(problems))

    @property
    def name(self) -> str:
        """The canonical strategy name."""
        return format_strategy(self)

    @property
    def info(self) -> ScoreInfo:
        """The score's registry entry: what it reads and what it needs."""
        return get_score(self.score)

    @property
    def needs_thresholds(self) -> bool:
        """Whether the loop must compute the thresholding result (§7) before selecting."""
        return self.info.needs_thresholds

    @property
    def needs_calibration(self) -> bool:
        """Whether the loop must calibrate before selecting (``calib``, or a score that reads
        calibrated columns itself)."""
        return self.calib or self.info.needs_calibration

    @property
    def needs_predictions(self) -> bool:
        """Whether selecting reads the previous model's predictions of the pool (``random``
        alone does not: its loop skips predicting the pool)."""
        return (
            bool(self.info.columns) or self.perc or self.needs_thresholds or self.needs_calibration
        )

    @property
    def prunes(self) -> bool:
        """Whether the pool is pruned before iteration 0 (and so needs its image hashes)."""
        return self.prune != "none"


def _spec_problems(spec: StrategySpec) -> list[str]:
    problems = []
    if spec.score not in registered_scores() and spec.score not in COLUMN_SCORES:
        problems.append(f"unknown score {spec.score!r}{did_you_mean(spec.score, _scores())}")
    if spec.prune not in ("none", "prune", "full_prune"):
        problems.append(f"prune must be none, prune or full_prune, not {spec.prune!r}")
    if spec.prune_random and spec.prune == "none":
        problems.append("'rand' (random pruning) needs 'prune' or 'full_prune' before it")
    if spec.aggregation not in ("max", "mean"):
        problems.append(f"aggregation must be max or mean, not {spec.aggregation!r}")
    if spec.ordering not in registered_orderings():
        problems.append(
            f"ordering must be one of {', '.join(registered_orderings())}, not {spec.ordering!r}"
        )
    return problems


def _scores() -> list[str]:
    return [*registered_scores(), *COLUMN_SCORES]


def format_strategy(spec: StrategySpec) -> str:
    """The canonical name of ``spec``: modifiers in a fixed order, the score last.

    ``box`` has no effect and is never written; ``highep_lowal`` is written with its
    components, ``highep_lowal_alluncert``.
    """
    parts: list[str] = []
    if spec.prune != "none":
        parts.append(spec.prune)
    if spec.prune_random:
        parts.append("rand")
    parts += [tok for tok in ("perc", "calib", "norm") if getattr(spec, tok)]
    if spec.ordering != "topk":
        parts.append(spec.ordering)
    if spec.aggregation == "mean":
        parts.append("mean")
    parts += ["highep_lowal", "alluncert"] if spec.score == "highep_lowal" else [spec.score]
    return "_".join(parts)


def _next_token(rest: str) -> str | None:
    """The longest vocabulary word that ``rest`` starts with, followed by ``_`` or the end."""
    for word in reversed(_vocab()):
        if rest == word or rest.startswith(word + "_"):
            return word
    return None


def _tokenize(name: str) -> list[tuple[int, str]]:
    """Split ``name`` into (position, token) pairs by longest match against the vocabulary."""
    tokens: list[tuple[int, str]] = []
    rest = name
    while rest:
        word = _next_token(rest)
        if word is None:
            head = rest.split("_", 1)[0]
            raise StrategyError(
                f"strategy {name!r}: unknown token {head!r} at position {len(tokens)}"
                f"{did_you_mean(head, _vocab()) or did_you_mean(rest, _vocab())}; "
                f"valid scores: {', '.join(registered_scores())} or a predictions column; "
                f"modifiers: {', '.join(MODIFIERS)}"
            )
        tokens.append((len(tokens), word))
        rest = rest[len(word) + 1 :]
    return tokens


_FLAG_TOKENS: Final = {"perc": "perc", "calib": "calib", "norm": "norm"}


def _apply_modifier(fields_: dict[str, Any], pos: int, tok: str, name: str) -> None:
    def conflict(field: str, current: object) -> StrategyError:
        return StrategyError(
            f"strategy {name!r}: token {tok!r} at position {pos} conflicts with "
            f"{current!r} already given ({field})"
        )

    if tok in ("prune", "full_prune"):
        if fields_["prune"] != "none":
            raise conflict("prune", fields_["prune"])
        fields_["prune"] = tok
    elif tok == "rand":
        if fields_["prune"] == "none":
            raise StrategyError(
                f"strategy {name!r}: token 'rand' at position {pos} must follow 'prune' or "
                "'full_prune' (random pruning); the random score is 'random'"
            )
        fields_["prune_random"] = True
    elif tok in ("bottomk", "nee"):
        if fields_["ordering"] != "topk":
            raise conflict("ordering", fields_["ordering"])
        fields_["ordering"] = tok
    elif tok == "mean":
        fields_["aggregation"] = "mean"
    elif tok in _FLAG_TOKENS:
        fields_[_FLAG_TOKENS[tok]] = True


def _parse_string(name: str) -> StrategySpec:
    if not name or name != name.strip() or name.startswith("_") or "__" in name:
        raise StrategyError(f"strategy {name!r}: expected tokens joined by single '_'")
    tokens = _tokenize(name)
    values: dict[str, Any] = {"prune": "none", "ordering": "topk", "aggregation": "max"}
    seen: set[str] = set()
    score: tuple[int, str] | None = None
    fusion: int | None = None
    for pos, tok in tokens:
        if tok in FOREIGN_TOKENS:
            raise StrategyError(
                f"strategy {name!r}: token {tok!r} at position {pos} is {FOREIGN_TOKENS[tok]}"
            )
        if score is not None:
            kind = "score" if tok not in MODIFIERS else "modifier"
            raise StrategyError(
                f"strategy {name!r}: {kind} {tok!r} at position {pos} comes after the score "
                f"{score[1]!r} (position {score[0]}); "
                + ("only one score is allowed" if kind == "score" else "the score must be last")
            )
        if tok in seen:
            raise StrategyError(f"strategy {name!r}: token {tok!r} at position {pos} is repeated")
        seen.add(tok)
        if tok == "highep_lowal":
            fusion = pos
        elif tok in MODIFIERS:
            _apply_modifier(values, pos, tok, name)
        else:
            score = (pos, tok)
    return _finish(name, values, score, fusion)


def _finish(
    name: str, values: dict[str, Any], score: tuple[int, str] | None, fusion: int | None
) -> StrategySpec:
    if fusion is not None:
        if score is not None and score[1] != "alluncert":
            raise StrategyError(
                f"strategy {name!r}: 'highep_lowal' (position {fusion}) fuses the alluncert "
                f"components; score {score[1]!r} at position {score[0]} conflicts with it"
            )
        return StrategySpec(score="highep_lowal", **values)
    if score is None:
        raise StrategyError(
            f"strategy {name!r}: no score; end the name with one of "
            f"{', '.join(registered_scores())} or a predictions column"
        )
    return StrategySpec(score=score[1], **values)


def _parse_mapping(data: Mapping[str, Any]) -> StrategySpec:
    known = {f.name for f in fields(StrategySpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StrategyError(
            f"strategy mapping: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    if "score" not in data:
        raise StrategyError("strategy mapping: 'score' is required")
    return StrategySpec(**dict(data))


def parse_strategy(strategy: str | Mapping[str, Any] | StrategySpec) -> StrategySpec:
    """Parse a strategy name (or its structured mapping) into a ``StrategySpec``.

    Args:
        strategy: e.g. ``"perc_calib_norm_bottomk_mean_albox"``, or a mapping with the
            ``StrategySpec`` fields (``{"score": "albox", "perc": true}``), as YAML may give it.

    Raises:
        StrategyError: (a ``ValueError``) naming the offending token, its position and close
            matches.
    """
    if isinstance(strategy, StrategySpec):
        return strategy
    if isinstance(strategy, Mapping):
        return _parse_mapping(strategy)
    if not isinstance(strategy, str):
        raise StrategyError(f"strategy must be a string or a mapping, not {type(strategy)}")
    return _parse_string(strategy)


def explain(spec: StrategySpec) -> list[str]:
    """One line per pipeline stage that ``spec`` turns on, for ``detloop explain-strategy``."""
    lines = [f"canonical name: {format_strategy(spec)}"]
    if spec.prune != "none":
        how = "randomly" if spec.prune_random else "by perceptual-hash duplicates"
        after = "budgets rescaled" if spec.prune == "prune" else "one training on the rest"
        lines.append(f"before the loop: {spec.prune} {how} ({after})")
    cols = "calibrated *_cal columns" if spec.calib else "uncalibrated columns"
    box = "; box stds relative to box size" if spec.norm else ""
    lines.append(f"prepare: {cols}{box}")
    info = spec.info
    direction = "higher = more uncertain" if info.higher_is_uncertain else "higher = more certain"
    lines.append(f"score: {spec.score} ({info.description}; {direction})")
    lines.append(f"aggregate per image: {spec.aggregation}")
    if spec.perc:
        lines.append("class weights: perc (inverse predicted class frequency)")
    order = {
        "topk": "top-k, highest first",
        "bottomk": "bottom-k, lowest first",
        "nee": "nee, 5 score bins",
    }
    lines.append(f"ordering: {order[spec.ordering]}; ties by image_id")
    return lines


__all__ = [
    "COLUMN_SCORES",
    "MODIFIERS",
    "StrategyError",
    "StrategySpec",
    "explain",
    "format_strategy",
    "parse_strategy",
]
