"""Pseudo-label selection and weighting (ALGORITHMS §11.2) and PLS image sorting (§11.7).

``selection_strategy`` uses the AL prefixes ``calib``, ``box``, ``norm`` plus ``pseudoscore``
(weight the pseudo-labels) and ``selftrain`` (re-predict and retrain; the loop's business),
then one of ``score`` (default), ``combo``, ``alluncert`` (alias ``all_uncert``), ``epuncert``,
``ental``, ``pcorrect`` (P(right) learned on validation, ``pseudo_correctness``; beyond the
reference) or any predictions column. Every rule keeps a detection iff one signal exceeds τ
(``selection_signal``), so τ can also be fitted for a precision target
(``pseudo_ranking.fit_tau``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.data.labels import IGNORE_CLASS_ID, box_rows, labels_from_boxes
from detloop.selectors.columns import BoolArray, DetColumns, FloatArray
from detloop.selectors.pseudo_correctness import CorrectnessModel
from detloop.selectors.scores import ScoreContext, combo_values, get_score, registered_scores
from detloop.selectors.ssl_pls import pls_d, pls_detections, rarity
from detloop.selectors.ssl_pls import pls_select as pls_select  # re-exported: PLS of §11.7
from detloop.selectors.stages import min_max
from detloop.selectors.vocabulary import COLUMN_SCORES, StrategyError, did_you_mean

EPS: Final = 1e-12
PSEUDO_SCORES: Final = ("score", "combo", "alluncert", "epuncert", "ental", "pcorrect")
_FLAGS: Final = ("calib", "box", "norm", "pseudoscore", "selftrain")


@dataclass(frozen=True)
class PseudoSpec:
    """A parsed ``selection_strategy``."""

    score: str = "score"
    calib: bool = False
    norm: bool = False
    pseudoscore: bool = False
    selftrain: bool = False

    @property
    def name(self) -> str:
        flags = [f for f in ("pseudoscore", "selftrain", "calib", "norm") if getattr(self, f)]
        return "_".join([*flags, self.score])

    @property
    def needs_thresholds(self) -> bool:
        """``combo`` keeps u < δ̄ of the teacher's cost-sensitive thresholds (§7)."""
        return self.score == "combo"

    @property
    def needs_correctness(self) -> bool:
        """``pcorrect`` keeps P(right) > τ of a model fitted on validation
        (``selectors.pseudo_correctness``)."""
        return self.score == "pcorrect"

    @property
    def needs_calibration(self) -> bool:
        """Calibrated columns (``calib``, or a ``*_cal`` column) need the teacher calibrated."""
        return self.calib or self.score.endswith("_cal")


#: ``teacher_strategy`` tokens (ALGORITHMS §11.3 RCC, §11.4 RCF) and the option each sets.
TEACHER_TOKENS: Final = {
    "rcc": "rcc",
    "scale": "rcc_scale",
    "manual_augmentations": "rcc_manual_augmentations",
    "full_im": "rcc_full_im",
    "curriculum_learning": "curriculum",
    "aug": "curriculum_aug",
    "imscore": "imscore",
    "curr": "curriculum_pseudo",
}


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``teacher_strategy``: the SSL building blocks of the teacher's (and student's
    labeled part's) training. Empty (the default) is plain STAC."""

    rcc: bool = False
    rcc_scale: bool = False
    rcc_manual_augmentations: bool = False
    rcc_full_im: bool = False
    curriculum: bool = False
    curriculum_aug: bool = False
    imscore: bool = False
    curriculum_pseudo: bool = False

    @property
    def name(self) -> str:
        """Canonical form: the set tokens in ``TEACHER_TOKENS`` order ('' when none)."""
        return "_".join(tok for tok, field in TEACHER_TOKENS.items() if getattr(self, field))

    @property
    def blocks(self) -> list[str]:
        """The tokens that are set."""
        return [tok for tok, field in TEACHER_TOKENS.items() if getattr(self, field)]


def parse_teacher_strategy(name: str) -> TeacherSpec:
    """Parse a ``teacher_strategy`` such as ``rcc_curriculum_learning_aug`` (any order; ``-``,
    ``+`` or ``_`` between tokens).

    Raises:
        StrategyError: an unknown token (with close matches), or an option without its block
            (``scale``/``manual_augmentations``/``full_im`` need ``rcc``, ``aug`` needs
            ``curriculum_learning``).
    """
    rest = name.strip().replace("-", "_").replace("+", "_")
    flags: dict[str, bool] = {}
    # longest tokens first, so `curriculum_learning` is not read as `curr` + garbage
    tokens = sorted(TEACHER_TOKENS, key=len, reverse=True)
    while rest:
        tok = next((t for t in tokens if rest == t or rest.startswith(t + "_")), None)
        if tok is None:
            bad = rest.split("_")[0]
            raise StrategyError(
                f"teacher strategy {name!r}: unknown token {bad!r}"
                f"{did_you_mean(bad, list(TEACHER_TOKENS))}; valid: {', '.join(TEACHER_TOKENS)}"
            )
        flags[TEACHER_TOKENS[tok]] = True
        rest = rest[len(tok) + 1 :]
    spec = TeacherSpec(**flags)
    needs = {"rcc_scale": "rcc", "rcc_manual_augmentations": "rcc", "rcc_full_im": "rcc"}
    needs["curriculum_aug"] = "curriculum"
    for option, block in needs.items():
        if getattr(spec, option) and not getattr(spec, block):
            raise StrategyError(
                f"teacher strategy {name!r}: {option} needs "
                f"{next(t for t, f in TEACHER_TOKENS.items() if f == block)!r}"
            )
    return spec


def parse_pseudo_strategy(name: str) -> PseudoSpec:
    """Parse an SSL ``selection_strategy`` such as ``pseudoscore_calib_alluncert``.

    Raises:
        StrategyError: an unknown token (with its position and close matches) or no score.
    """
    rest = name.strip()
    flags: dict[str, bool] = {}
    pos = 0
    while rest:
        tok = next((f for f in _FLAGS if rest == f or rest.startswith(f + "_")), None)
        if tok is None:
            break
        flags[tok] = True
        rest = rest[len(tok) + 1 :]
        pos += 1
    score = "alluncert" if rest == "all_uncert" else rest or "score"
    if score not in PSEUDO_SCORES and score not in COLUMN_SCORES:
        choices = [*PSEUDO_SCORES, "all_uncert", *COLUMN_SCORES, *_FLAGS]
        raise StrategyError(
            f"selection strategy {name!r}: unknown score {rest!r} at position {pos}"
            f"{did_you_mean(rest, choices)}; valid: {', '.join(PSEUDO_SCORES)} or a column"
        )
    flags.pop("box", None)
    return PseudoSpec(score=score, **flags)


@dataclass(frozen=True)
class ConsistencyFilter:
    """What a pseudo-label must also pass on the consistency signals (§11.6): ``cons_iou`` ≥
    ``min_cons_iou`` (None: no test) and, with ``cons_cls``, ``cons_cls`` true. A null signal
    passes no test."""

    min_cons_iou: float | None = None
    cons_cls: bool = False

    @property
    def active(self) -> bool:
        return self.min_cons_iou is not None or self.cons_cls

    def keep(self, predictions: pa.Table) -> BoolArray:
        """Per row, whether it passes.

        Raises:
            ValueError: a column the filter needs is missing (predictions made without
                ``predict.consistency_ssl``).
        """
        keep = np.ones(predictions.num_rows, dtype=bool)
        needed = {"cons_iou": self.min_cons_iou is not None, "cons_cls": self.cons_cls}
        for column, on in needed.items():
            if on and column not in predictions.column_names:
                raise ValueError(
                    f"pseudo-label filter on {column!r}: the predictions have no such column "
                    "(they were made without predict.consistency_ssl)"
                )
        if self.min_cons_iou is not None:
            cons = np.asarray(
                predictions["cons_iou"].to_numpy(zero_copy_only=False), dtype=np.float32
            )
            keep &= cons >= _as_stored(self.min_cons_iou)  # NaN (null) fails
        if self.cons_cls:
            same = pc.fill_null(predictions["cons_cls"], False)
            keep &= np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        return keep


def vector_certainty(
    cols: DetColumns, score: str, reference: DetColumns | None = None
) -> FloatArray:
    """The certainty of a vector strategy (``alluncert``, ``epuncert``, ``ental``) per
    detection: min-max(1 / max(ε, m)) of m, the mean of the AL score's own components
    (relative box stds, class uncertainty) (§11.2). The min and max are ``cols``' own, or
    ``reference``'s (clipped to [0, 1]): the scale of another set of detections, so that a
    threshold fitted on one set (validation) means the same on the other (the pool).

    Raises:
        ValueError: ``score`` is not a vector score.
    """
    inverse = _inverse_uncertainty(cols, score)
    if reference is None:
        return min_max(inverse)
    ref = _inverse_uncertainty(reference, score)
    if len(ref) == 0:
        return np.zeros_like(inverse)
    lo, span = ref.min(), ref.max() - ref.min()
    if span <= 0:
        return np.zeros_like(inverse)
    out: FloatArray = np.clip((inverse - lo) / span, 0.0, 1.0)
    return out


def _inverse_uncertainty(cols: DetColumns, score: str) -> FloatArray:
    info = get_score(score) if score in registered_scores() else None
    if info is None or info.kind != "vector":
        raise ValueError(f"{score!r} is not a vector uncertainty score")
    out: FloatArray = 1.0 / np.maximum(EPS, info.fn(cols, ScoreContext()).mean(axis=1))
    return out


def _certainty_and_signal(
    cols: DetColumns,
    spec: PseudoSpec,
    thresholds: Mapping[str, Any] | None,
    reference: DetColumns | None = None,
    correctness: CorrectnessModel | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(certainty, u, signal) per detection for the strategies of §11.2; a detection is kept
    iff signal > τ:

    - ``score`` or a column strategy: the value (score > τ);
    - ``combo``: the score where u < δ̄, else −∞ (score > τ and u < δ̄);
    - ``alluncert``: min(score, certainty) (score > τ and, as the reference, certainty > τ);
    - ``epuncert``, ``ental``: the score (their certainty only weighs);
    - ``pcorrect``: P(right) of ``correctness`` (its certainty too).

    Raises:
        ValueError: ``pcorrect`` without a correctness model.
    """
    score = cols.get("score")
    n = cols.n_rows
    nan = np.full(n, np.nan)
    if spec.needs_correctness:
        if correctness is None:
            raise ValueError("'pcorrect' needs the correctness model fitted on validation")
        p = correctness.predict(cols)
        return p, nan, p
    if spec.score == "combo":
        u = combo_values(cols, thresholds)
        assert thresholds is not None  # combo_values raised otherwise
        delta = _threshold_mean(thresholds)
        certainty = 1.0 - u / delta if delta > 0 else nan
        return certainty, u, np.where(u < delta, score, -np.inf)
    info = get_score(spec.score) if spec.score in registered_scores() else None
    if info is not None and info.kind == "vector":
        certainty = vector_certainty(cols, spec.score, reference)
        signal = np.minimum(score, certainty) if spec.score == "alluncert" else score
        return certainty, nan, signal
    value = cols.get(spec.score)  # `score` or any predictions column, filtered like the score
    return np.clip(value, 0.0, 1.0), nan, value


def selection_signal(
    predictions: pa.Table,
    spec: PseudoSpec | str,
    thresholds: Mapping[str, Any] | None = None,
    reference: pa.Table | None = None,
    correctness: CorrectnessModel | None = None,
) -> FloatArray:
    """Per detection, the value whose threshold is the strategy's keep rule (kept iff > τ;
    see ``_certainty_and_signal``), on the certainty scale of ``reference``'s detections when
    given (alluncert's min-max; None: ``predictions``' own)."""
    spec = parse_pseudo_strategy(spec) if isinstance(spec, str) else spec
    cols = DetColumns(predictions, calib=spec.calib)
    ref = None if reference is None else DetColumns(reference, calib=spec.calib)
    return _certainty_and_signal(cols, spec, thresholds, ref, correctness)[2]


def _as_stored(threshold: float) -> float:
    """``threshold`` rounded like the float32 columns it is compared with, so that a score
    stored as exactly τ compares equal to τ."""
    return float(np.float32(threshold))


def _threshold_mean(thresholds: Mapping[str, Any]) -> float:
    """δ̄ of a thresholding result; a null threshold means +inf (nothing is removed)."""
    if "threshold_mean" in thresholds:
        value = thresholds["threshold_mean"]
        return math.inf if value is None else float(value)
    values = thresholds.get("thresholds")
    if isinstance(values, Mapping):
        values = list(values.values())
    if not values:
        raise ValueError("thresholding result has neither 'threshold_mean' nor 'thresholds'")
    return float(np.mean([math.inf if v is None else float(v) for v in values]))


def select_pseudo_labels(
    predictions: pa.Table,
    spec: PseudoSpec | str,
    tau: float = 0.4,
    thresholds: Mapping[str, Any] | None = None,
    consistency: ConsistencyFilter | None = None,
    correctness: CorrectnessModel | None = None,
) -> pa.Table:
    """The teacher detections kept as pseudo-labels, with ``certainty``, ``u`` and ``weight``.

    Args:
        predictions: teacher predictions (min_score 0.1), schema.PREDICTIONS.
        spec: selection strategy.
        tau: δ_S; every strategy keeps score > τ (a column strategy filters that column).
        thresholds: thresholding result, for ``combo`` (weights and δ̄ = threshold_mean).
        consistency: also keep only detections passing these consistency tests (§11.6); the
            strategy's certainty (its min-max) is computed over all detections as before.
        correctness: the validation-fitted model of ``pcorrect``.

    Returns:
        image_id, det_id, class_id, score, x1..y2, certainty (null where the strategy has
        none), u (combo only) and weight: with ``pseudoscore`` the certainty (combo:
        1 − u/δ̄; score or column strategies: the value, clipped to [0, 1]), else 1.
    """
    spec = parse_pseudo_strategy(spec) if isinstance(spec, str) else spec
    cols = DetColumns(predictions, calib=spec.calib)
    certainty, u, signal = _certainty_and_signal(cols, spec, thresholds, None, correctness)
    keep = signal > _as_stored(tau)
    if consistency is not None and consistency.active:
        keep = keep & consistency.keep(predictions)
    rows = pa.array(np.flatnonzero(keep))
    base = predictions.select(["image_id", "det_id", "class_id", "score", *schema.COORDS])
    out = base.take(rows)
    cert = certainty[keep]
    has_cert = spec.score in ("alluncert", "epuncert", "ental", "combo", "pcorrect")
    weight = cert if spec.pseudoscore else np.ones(len(cert))
    out = out.append_column(
        "certainty", pa.array(cert, pa.float64(), mask=np.isnan(cert) | (not has_cert))
    )
    out = out.append_column("u", pa.array(u[keep], pa.float64(), mask=np.isnan(u[keep])))
    return out.append_column("weight", pa.array(np.nan_to_num(weight, nan=1.0), pa.float32()))


def pseudo_labels_table(kept: pa.Table, iteration: int | None, first_box_id: int = 0) -> pa.Table:
    """``labels`` rows (source ``pseudo``, their ``weight``, the round ``iteration``) for the
    output of ``select_pseudo_labels``; box ids count up from ``first_box_id``."""
    coords = np.stack([kept[c].to_numpy() for c in schema.COORDS], axis=1).astype(np.float64)
    boxes = box_rows(
        kept["image_id"].to_pylist(),
        coords.reshape(-1, 4),
        kept["class_id"].to_numpy(),
        first_box_id=first_box_id,
    )
    weight = kept["weight"].to_numpy() if kept.num_rows else None
    return labels_from_boxes(boxes, source="pseudo", iteration=iteration, weight=weight)


# the columns of a training stream's label rows (pseudo-labels and ignore regions alike)
STREAM_COLUMNS: Final = ("image_id", "class_id", *schema.COORDS, "weight")


def with_ignore_regions(pseudo: pa.Table, predictions: pa.Table, min_score: float) -> pa.Table:
    """A student's pseudo-label rows followed by ignore regions (``ssl.rejected: ignore``):
    every teacher detection with score ≥ ``min_score`` on an image of ``pseudo``, class
    ``IGNORE_CLASS_ID``. The detections the selection rejected are then neither object nor
    background for the student (an anchor matched to a pseudo-label stays positive; one that
    only a rejected detection covers is ignored), instead of the background they are when
    the reference trains on the kept boxes alone.

    Returns:
        ``STREAM_COLUMNS`` rows: ``pseudo``'s first, then the regions (weight 1, unused).
    """
    kept = pseudo.select(list(STREAM_COLUMNS))
    on_stream = pc.is_in(predictions["image_id"], value_set=pc.unique(pseudo["image_id"]))
    dets = predictions.filter(pc.and_(on_stream, pc.greater_equal(predictions["score"], min_score)))
    n = dets.num_rows
    types = {f.name: f.type for f in kept.schema}
    regions = pa.table(
        {
            "image_id": dets["image_id"].cast(types["image_id"]),
            "class_id": pa.array(np.full(n, IGNORE_CLASS_ID), types["class_id"]),
            **{c: dets[c].cast(types[c]) for c in schema.COORDS},
            "weight": pa.array(np.ones(n), types["weight"]),
        },
        schema=kept.schema,
    )
    return pa.concat_tables([kept, regions])


def cap_per_image(kept: pa.Table, max_per_image: int) -> pa.Table:
    """At most ``max_per_image`` rows per image: the highest scores (ties by det_id)."""
    if kept.num_rows == 0:
        return kept
    ordered = kept.sort_by(
        [("image_id", "ascending"), ("score", "descending"), ("det_id", "ascending")]
    )
    ids = np.asarray(ordered["image_id"].to_numpy(zero_copy_only=False), dtype=object)
    starts = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]
    rank = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    out = ordered.filter(pa.array(rank < max_per_image))
    return out.sort_by([("image_id", "ascending"), ("det_id", "ascending")])


# ---- PLS (§11.7) -----------------------------------------------------------------------------


def pls_scores(
    teacher: pa.Table, pseudo: pa.Table, tau: float = 0.4, beta: float = 0.1
) -> pa.Table:
    """PLS image scores S, C, D for every image holding a pseudo-label.

    S_i = #detections with score ≥ δ_S / #detections (teacher detections with score ≥ 0.1);
    C_i = mean over the image's pseudo-labels of (1 − share of its class among all
    pseudo-labels); D_i = (1 − β)·S_i + β·C_i.
    """
    teacher = pls_detections(teacher)
    t_ids = teacher["image_id"].combine_chunks()
    t_score = np.asarray(teacher["score"].to_numpy(), dtype=np.float64)
    ids = pc.unique(pseudo["image_id"].combine_chunks())
    ids = ids.take(pc.sort_indices(ids))
    t_code = np.asarray(pc.fill_null(pc.index_in(t_ids, value_set=ids), -1).to_numpy())
    ok = t_code >= 0
    n_img = len(ids)
    drate0 = np.bincount(t_code[ok], minlength=n_img)
    drate_tau = np.bincount(t_code[ok & (t_score >= _as_stored(tau))], minlength=n_img)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(drate0 > 0, drate_tau / np.maximum(drate0, 1), 0.0)
    p_code = np.asarray(pc.index_in(pseudo["image_id"], value_set=ids).to_numpy())
    c = rarity(p_code, pseudo["class_id"].to_numpy(), n_img)
    return pa.table({"image_id": ids, "S": s, "C": c, "D": pls_d(s, c, beta)})
