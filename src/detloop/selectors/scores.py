"""The score registry: per-detection uncertainty scores (ALGORITHMS §9.3).

A score is a registered function ``fn(cols, ctx) -> np.ndarray`` giving one value per kept
detection (shape ``(n,)``), or one vector per detection (shape ``(n, k)``) for combinations that
are fused per image later. Metadata travels with it: ``kind``, the columns it needs,
``higher_is_uncertain`` and, for vectors, the component names and the fusion rule. Any
predictions column is a score too (``get_score`` builds its entry on demand).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from detloop.data.schema import AL_COLS, MC_COLS
from detloop.selectors.columns import DetColumns, FloatArray
from detloop.selectors.vocabulary import COLUMN_SCORES, StrategyError

ScoreKind = Literal["scalar", "vector", "image"]
Fusion = Literal["none", "sum", "highep_lowal", "sota"]


@dataclass(frozen=True)
class ScoreContext:
    """What a score may need besides the columns.

    Attributes:
        rng: generator for ``random``.
        thresholds: the thresholding result (§7.4 JSON) for ``combo``.
        norm: box stds relative to box size (``norm``) for ``albox``/``mcbox``.
        n_images: the number of candidate images, for ``image`` scores (one value per image).
    """

    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    thresholds: Mapping[str, Any] | None = None
    norm: bool = False
    n_images: int | None = None


ScoreFn = Callable[[DetColumns, ScoreContext], FloatArray]


@dataclass(frozen=True)
class ScoreInfo:
    """A registered score and its metadata.

    Attributes:
        kind: ``scalar`` (one value per detection), ``vector`` (components per detection,
            fused per image by ``fusion``) or ``image`` (one value per candidate image, images
            without detections included: ``random``).
        columns: the predictions columns it reads.
        higher_is_uncertain: whether a larger value means a less certain detection (top-k
            then queries the most uncertain images).
        needs_thresholds: it reads the thresholding result (§7), which the loop must compute.
        needs_calibration: it reads calibrated columns whatever the ``calib`` modifier says.
    """

    name: str
    fn: ScoreFn
    kind: ScoreKind
    columns: tuple[str, ...]
    higher_is_uncertain: bool
    description: str
    components: tuple[str, ...] = ()
    fusion: Fusion = "none"
    needs_thresholds: bool = False
    needs_calibration: bool = False


_REGISTRY: dict[str, ScoreInfo] = {}


def register_score(
    name: str,
    *,
    kind: ScoreKind = "scalar",
    columns: tuple[str, ...] = (),
    description: str,
    higher_is_uncertain: bool = True,
    components: tuple[str, ...] = (),
    fusion: Fusion = "none",
    needs_thresholds: bool = False,
    needs_calibration: bool = False,
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding ``fn`` to the registry under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _REGISTRY:
            raise ValueError(f"score {name!r} is already registered")
        _REGISTRY[name] = ScoreInfo(
            name,
            fn,
            kind,
            columns,
            higher_is_uncertain,
            description,
            components,
            fusion,
            needs_thresholds,
            needs_calibration,
        )
        return fn

    return deco


def registered_scores() -> tuple[str, ...]:
    """Names of the registered scores (not counting plain predictions columns)."""
    return tuple(_REGISTRY)


def list_scores(pattern: str = "*", include_columns: bool = False) -> list[ScoreInfo]:
    """Registered scores (and optionally column scores) whose name matches the glob."""
    names = list(_REGISTRY) + ([c for c in COLUMN_SCORES if c not in _REGISTRY] * include_columns)
    return [get_score(n) for n in names if fnmatch.fnmatchcase(n, pattern)]


def _column_score(name: str) -> ScoreInfo:
    def fn(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
        return cols.get(name)

    return ScoreInfo(
        name,
        fn,
        "scalar",
        (name,),
        name != "score",
        f"the predictions column {name!r} as it is (lists averaged)",
    )


def get_score(name: str) -> ScoreInfo:
    """The registry entry of ``name`` (a registered score or any predictions column)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in COLUMN_SCORES:
        return _column_score(name)
    raise StrategyError(f"unknown score {name!r}; registered: {', '.join(_REGISTRY)}")


# ---- single uncertainties ----------------------------------------------------------------


@register_score(
    "random",
    kind="image",
    description="seeded uniform value per candidate image (images without detections too)",
)
def _random(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    if ctx.n_images is None:
        raise ValueError("'random' scores images: the context needs n_images")
    out: FloatArray = ctx.rng.random(ctx.n_images)
    return out


@register_score("entropy", columns=("entropy",), description="softmax entropy in bits")
def _entropy(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return cols.get("entropy")


@register_score("mcclass", columns=("mc_class",), description="MC-dropout class logit std")
def _mcclass(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return cols.get("mc_class")


@register_score(
    "albox",
    columns=AL_COLS,
    description="aleatoric box std, mean of 4 corners (px; relative with norm)",
)
def _albox(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return cols.box_std("al", ctx.norm)


@register_score(
    "mcbox",
    columns=MC_COLS,
    description="epistemic box std, mean of 4 corners (px; relative with norm)",
)
def _mcbox(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return cols.box_std("mc", ctx.norm)


# ---- combinations --------------------------------------------------------------------------

#: Uncertainty names of the thresholding result (§7.2) and how to read them.
_COMBO_TERMS: Final[dict[str, Callable[[DetColumns], FloatArray]]] = {
    "entropy": lambda c: c.get("entropy"),
    "mc_class": lambda c: c.get("mc_class"),
    "mcclass": lambda c: c.get("mc_class"),
    "albox_rel": lambda c: c.box_std("al", True),
    "albox": lambda c: c.box_std("al", True),
    "mcbox_rel": lambda c: c.box_std("mc", True),
    "mcbox": lambda c: c.box_std("mc", True),
}


def combo_weights(thresholds: Mapping[str, Any] | None) -> list[tuple[str, float]]:
    """(uncertainty, weight) pairs of a thresholding result, checked.

    Raises:
        ValueError: no result, or unknown uncertainty names / mismatched or non-finite weights.
    """
    if thresholds is None:
        raise ValueError("'combo' needs the thresholding result (§7): run threshold first")
    names = list(thresholds.get("uncertainties") or [])
    weights = [float(w) for w in thresholds.get("weights") or []]
    if not names or len(names) != len(weights):
        raise ValueError(
            "thresholding result needs 'uncertainties' and as many 'weights', "
            f"got {names!r} and {weights!r}"
        )
    unknown = [n for n in names if n not in _COMBO_TERMS]
    if unknown:
        raise ValueError(f"thresholding result: unknown uncertainties {unknown}")
    if not all(np.isfinite(weights)):
        raise ValueError(f"thresholding result: weights must be finite numbers, got {weights!r}")
    return list(zip(names, weights, strict=True))


def combo_values(cols: DetColumns, thresholds: Mapping[str, Any] | None) -> FloatArray:
    """u = Σ_i w_i·u_i on the scale the thresholds were optimised on (§7.2).

    The calibrated columns are read when the result says ``calibrated: true`` (the weights
    were fitted on them); without that key the view's own ``calib`` setting holds.
    """
    pairs = combo_weights(thresholds)
    assert thresholds is not None  # checked by combo_weights
    if "calibrated" in thresholds:
        cols = cols.with_calib(bool(thresholds["calibrated"]))
    u = np.zeros(cols.n_rows, dtype=np.float64)
    for name, weight in pairs:
        u += weight * _COMBO_TERMS[name](cols)
    return u


@register_score(
    "combo",
    columns=("entropy", *AL_COLS),
    description="w1*entropy + w2*rel(al) with the weights of the thresholding result (§7)",
    needs_thresholds=True,
    needs_calibration=True,
)
def _combo(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return combo_values(cols, ctx.thresholds)


def _stack(*parts: FloatArray) -> FloatArray:
    """(n, k) with contiguous columns (Fortran order): aggregation works column by column."""
    out: FloatArray = np.empty((len(parts[0]), len(parts)), dtype=np.float64, order="F")
    for j, part in enumerate(parts):
        out[:, j] = part
    return out


@register_score(
    "ental",
    kind="vector",
    columns=("entropy", *AL_COLS),
    description="rel(al) + entropy, summed after min-max scaling",
    components=("albox_rel", "entropy"),
    fusion="sum",
)
def _ental(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return _stack(cols.box_std("al", True), cols.get("entropy"))


@register_score(
    "epuncert",
    kind="vector",
    columns=("mc_class", *MC_COLS),
    description="rel(mc) + mc_class, summed after min-max scaling",
    components=("mcbox_rel", "mc_class"),
    fusion="sum",
)
def _epuncert(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    return _stack(cols.box_std("mc", True), cols.get("mc_class"))


def _all_components(cols: DetColumns, ctx: ScoreContext) -> FloatArray:
    out = np.empty((cols.n_rows, 3), dtype=np.float64, order="F")
    cols.box_std("mc", True, out=out[:, 0])
    cols.box_std("al", True, out=out[:, 1])
    out[:, 2] = cols.raw("mc_class")
    return out


_ALL: Final = ("mc_class", *MC_COLS, *AL_COLS)
_ALL_COMPONENTS: Final = ("mcbox_rel", "albox_rel", "mc_class")

register_score(
    "alluncert",
    kind="vector",
    columns=_ALL,
    description="rel(mc) + rel(al) + mc_class, summed after min-max scaling",
    components=_ALL_COMPONENTS,
    fusion="sum",
)(_all_components)
register_score(
    "highep_lowal",
    kind="vector",
    columns=_ALL,
    description="(rel(mc) + mc_class) - rel(al) after min-max scaling",
    components=_ALL_COMPONENTS,
    fusion="highep_lowal",
)(_all_components)
register_score(
    "sota",
    kind="vector",
    columns=_ALL,
    description="max of z-scored rel(mc), rel(al), mc_class (Choi et al. 2021)",
    components=_ALL_COMPONENTS,
    fusion="sota",
)(_all_components)

__all__ = ["ScoreContext", "ScoreInfo", "get_score", "list_scores", "register_score"]
