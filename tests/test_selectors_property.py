"""Property tests: selection gives every scored image a finite score, on any valid table (§9).

Random predictions tables (hypothesis) with the edge cases real models produce: one image or
many, images without detections or with one, constant columns, all-equal values, zero-size
boxes and float32 extremes (0, 1e-30, 3e38, the float32 maximum). For every registered score,
a few column scores and every modifier, ``select`` must return a full ranking in which every
scored image has a finite score (a NaN would rank after every scored image, the bug of
issue 11). Pure selectors: no Ray, no torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.selectors.columns import MissingColumnError, NonFiniteColumnError
from detloop.selectors.pipeline import SelectContext, select
from detloop.selectors.scores import get_score, registered_scores
from detloop.selectors.stages import fuse, min_max, perc_weights, z_score
from detloop.selectors.strategy import COLUMN_SCORES, StrategySpec, format_strategy

F32_MAX = float(np.finfo(np.float32).max)
EXTREMES = (0.0, 1e-30, 1e-6, 0.25, 1.0, 3.0, 1e6, 3e38, F32_MAX)
MIN_SCORE = 0.4
DET_SCORES = (0.0, MIN_SCORE, 0.41, 0.9, 1.0)  # exactly min_score is not kept
N_CLASSES = 3
THRESHOLDS = {"uncertainties": ["entropy", "albox"], "weights": [0.5, 0.5]}
SCORES = (*registered_scores(), "entropy", "mc_x1", "score", "mc_class_vec")
SCALAR_COLS = (
    "entropy",
    "mc_class",
    *schema.AL_COLS,
    *schema.MC_COLS,
    *(f"{c}_cal" for c in schema.UNCERTAINTY_COLS),
)
PROPERTY = settings(max_examples=15, deadline=None, derandomize=True, database=None)

values = st.sampled_from(EXTREMES) | st.floats(0.0, F32_MAX, width=32)
sizes = st.sampled_from((0.0, 1e-30, 1e-6, 1.0, 100.0, 3e38))
corners = st.sampled_from((0.0, 1.0, 500.0, 1e4))


@dataclass(frozen=True)
class Case:
    """A predictions table, its images table and what selection must see in it."""

    predictions: pa.Table
    images: pa.Table
    candidates: list[str]
    n_det: dict[str, int]  # detections above MIN_SCORE per candidate


def _column(draw: st.DrawFn, n: int, elements: st.SearchStrategy[float], equal: bool) -> Any:
    """n values: all equal (``equal`` or a coin flip) or drawn one by one."""
    if equal or draw(st.booleans()):
        return [draw(elements)] * n
    return draw(st.lists(elements, min_size=n, max_size=n))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    n_labeled = draw(st.integers(0, 2))  # detections of a non-candidate image are ignored
    candidates = [f"c{i}" for i in range(len(counts))]
    image_of = [c for c, k in zip(candidates, counts, strict=True) for _ in range(k)]
    image_of += ["labeled"] * n_labeled
    n = len(image_of)
    equal = draw(st.booleans())  # every column constant: all-equal scores everywhere
    cols: dict[str, Any] = {
        "image_id": image_of,
        "det_id": pa.array(np.arange(n), pa.int32()),
        "class_id": pa.array(_column(draw, n, st.integers(0, N_CLASSES - 1), equal), pa.int32()),
        "score": _column(draw, n, st.sampled_from(DET_SCORES), equal),
    }
    for lo, hi in (("x1", "x2"), ("y1", "y2")):
        start = np.array(_column(draw, n, corners, equal), dtype=np.float64)
        cols[lo] = start
        cols[hi] = start + np.array(_column(draw, n, sizes, equal), dtype=np.float64)
    for name in SCALAR_COLS:
        cols[name] = _column(draw, n, values, equal)
    vectors = [_column(draw, N_CLASSES, values, equal) for _ in range(n)]
    cols["logits"] = pa.array(vectors, pa.list_(pa.float32()))
    cols["mc_class_vec"] = pa.array(vectors, pa.list_(pa.float32()))
    predictions = _predictions(cols)
    if n > 1 and draw(st.booleans()):  # rows of an image need not be adjacent
        predictions = predictions.take(pa.array(draw(st.permutations(range(n)))))
    images = _images(candidates, labeled=n_labeled > 0)
    kept = np.asarray(cols["score"], dtype=np.float32) > np.float32(MIN_SCORE)
    n_det = {
        c: int(sum(k for i, k in zip(image_of, kept, strict=True) if i == c)) for c in candidates
    }
    return Case(predictions, images, candidates, n_det)


def _predictions(cols: dict[str, Any]) -> pa.Table:
    """A validated predictions table from columns in any order (lists or Arrow arrays)."""
    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in cols.items()})
    order = [*schema.PREDICTIONS.schema.names, *(f.name for f in schema.PREDICTIONS.optional)]
    return schema.validate_table(table.select([c for c in order if c in cols]), schema.PREDICTIONS)


def _images(candidates: list[str], labeled: bool) -> pa.Table:
    ids = [*candidates, *(["labeled"] if labeled else [])]
    n = len(ids)
    table = pa.table(
        {
            "image_id": ids,
            "file": [f"{i}.png" for i in ids],
            "width": pa.array([256] * n, pa.int32()),
            "height": pa.array([256] * n, pa.int32()),
            "split": ["pool"] * n,
            "state": ["unlabeled"] * len(candidates) + ["labeled"] * labeled,
            "iteration": pa.nulls(n, pa.int32()),
            "phash": pa.nulls(n, pa.uint64()),
            "source_id": pa.nulls(n, pa.string()),
            "reason": pa.nulls(n, pa.string()),
        }
    )
    return schema.validate_table(table, schema.IMAGES)


def _check_selection(case: Case, spec: StrategySpec, budget: int, seed: int = 0) -> None:
    """Run ``select`` and assert the contract of a full, finite ranking."""
    name = format_strategy(spec)
    ctx = SelectContext(
        min_score=MIN_SCORE, rng=np.random.default_rng(seed), iteration=1, thresholds=THRESHOLDS
    )
    table = select(case.predictions, case.images, name, budget, ctx)
    n = len(case.candidates)
    ids = table["image_id"].to_pylist()
    rank = np.asarray(table["rank"].to_numpy())
    score = table["score"].to_pylist()
    selected = np.asarray(table["selected"].to_numpy(zero_copy_only=False))
    assert sorted(ids) == case.candidates, name
    assert sorted(rank.tolist()) == list(range(n)), name
    assert int(selected.sum()) == min(budget, n) and (selected == (rank < budget)).all(), name
    assert dict(zip(ids, table["n_det"].to_pylist(), strict=True)) == case.n_det, name
    scored = np.array([s is not None for s in score])
    assert all(np.isfinite(s) for s in score if s is not None), name
    has_det = np.array([case.n_det[i] > 0 for i in ids])
    # scored ⇔ a detection above min_score; random scores every image unless perc applies
    expect = has_det if spec.perc or spec.score != "random" else np.ones(n, dtype=bool)
    assert (scored == expect).all(), name
    # scored images rank before unscored ones
    if scored.any() and (~scored).any():
        assert rank[scored].max() < rank[~scored].min(), name
    if get_score(spec.score).kind == "vector":
        comps = table["components"].to_pylist()
        assert all((c is None) == (not s) for c, s in zip(comps, scored, strict=True)), name
        assert all(np.isfinite(c).all() for c in comps if c is not None), name
    if spec.ordering != "nee":
        _check_order(ids, rank, score, descending=spec.ordering == "topk")


def _check_order(ids: list[str], rank: np.ndarray, score: list[Any], descending: bool) -> None:
    """Scored images in score order; equal scores by image_id (the tie-break, §9.4)."""
    ranked = sorted((i for i, s in enumerate(score) if s is not None), key=lambda i: rank[i])
    keys = [(-score[i] if descending else score[i], ids[i]) for i in ranked]
    assert keys == sorted(keys)


def _spec(score: str, **mods: Any) -> StrategySpec:
    """The strategy; ``calib`` dropped for a column score without a ``_cal`` twin (a list)."""
    if score in COLUMN_SCORES and score != "score" and f"{score}_cal" not in COLUMN_SCORES:
        mods["calib"] = False
    return StrategySpec(score=score, **mods)


modifiers = st.fixed_dictionaries(
    {
        "perc": st.booleans(),
        "calib": st.booleans(),
        "norm": st.booleans(),
        "aggregation": st.sampled_from(("max", "mean")),
        "ordering": st.sampled_from(("topk", "bottomk", "nee")),
    }
)


@pytest.mark.parametrize("score", SCORES)
@PROPERTY
@given(case=cases(), mods=modifiers, budget=st.integers(0, 8), seed=st.integers(0, 3))
def test_every_scored_image_has_a_finite_score(
    score: str, case: Case, mods: dict[str, Any], budget: int, seed: int
) -> None:
    _check_selection(case, _spec(score, **mods), budget, seed)


# ---- every modifier combination on hand-made edge cases --------------------------------------


def _edge_case(counts: list[int], value: float, *, width: float = 10.0) -> Case:
    """Every image has ``counts[i]`` kept detections, every uncertainty equal to ``value``."""
    candidates = [f"c{i}" for i in range(len(counts))]
    image_of = [c for c, k in zip(candidates, counts, strict=True) for _ in range(k)]
    n = len(image_of)
    cols: dict[str, Any] = {
        "image_id": image_of,
        "det_id": pa.array(np.zeros(n, np.int32)),
        "class_id": pa.array(np.zeros(n, np.int32)),
        "score": [0.9] * n,
        "x1": [0.0] * n,
        "y1": [0.0] * n,
        "x2": [width] * n,
        "y2": [width] * n,
        **{c: [value] * n for c in SCALAR_COLS},
        "logits": pa.array([[value] * N_CLASSES] * n, pa.list_(pa.float32())),
        "mc_class_vec": pa.array([[value] * N_CLASSES] * n, pa.list_(pa.float32())),
    }
    n_det = dict(zip(candidates, counts, strict=True))
    return Case(_predictions(cols), _images(candidates, labeled=False), candidates, n_det)


EDGE_CASES = {
    "one image, one detection": ([1], 1.0, 10.0),
    "all equal, zero-size boxes": ([2, 1, 3, 0], 0.5, 0.0),
    "float32 maximum, 1e-30 boxes": ([1, 2, 1], F32_MAX, 1e-30),
    "zeros": ([1, 1, 0, 2], 0.0, 10.0),
}


def _grid(score: str) -> list[dict[str, Any]]:
    """Every modifier combination that changes ``score`` (``norm``: albox/mcbox only)."""
    norms = (False, True) if score in ("albox", "mcbox") else (False,)
    keys = ("perc", "calib", "norm", "aggregation", "ordering")
    axes = ((False, True), (False, True), norms, ("max", "mean"), ("topk", "bottomk", "nee"))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


@pytest.mark.parametrize("case_name", list(EDGE_CASES))
def test_every_modifier_combination_on_edge_cases(case_name: str) -> None:
    counts, value, width = EDGE_CASES[case_name]
    case = _edge_case(counts, value, width=width)
    budgets = itertools.cycle((0, 1, 2, len(case.candidates) + 1))
    for score in SCORES:
        for mods in _grid(score):
            _check_selection(case, _spec(score, **mods), next(budgets))


# ---- the stages on float32-range inputs --------------------------------------------------------

matrices = st.integers(1, 6).flatmap(
    lambda n: st.lists(
        st.lists(values | st.sampled_from((-F32_MAX, -1.0)), min_size=3, max_size=3),
        min_size=n,
        max_size=n,
    )
)


@PROPERTY
@given(rows=matrices, constant=st.booleans())
def test_scaling_and_fusion_stay_finite(rows: list[list[float]], constant: bool) -> None:
    x = np.asarray(rows, dtype=np.float64) / np.asarray([1.0, 1e-6, 1.0])  # rel(·) range
    if constant:
        x[:, 1] = x[0, 1]
    scaled = min_max(x)
    assert np.isfinite(scaled).all() and scaled.min() >= 0.0 and scaled.max() <= 1.0
    z = z_score(x)
    assert np.isfinite(z).all() and (np.abs(z) <= np.sqrt(len(x)) + 1e-9).all()
    for j in range(3):
        if (x[:, j] == x[0, j]).all():
            assert (scaled[:, j] == 0).all() and (z[:, j] == 0).all()
    for fusion in ("sum", "highep_lowal", "sota"):
        assert np.isfinite(fuse(x, fusion)).all()  # type: ignore[arg-type]


@PROPERTY
@given(classes=st.lists(st.integers(0, N_CLASSES - 1), min_size=1, max_size=12), data=st.data())
def test_perc_weights_finite_exactly_where_an_image_has_detections(
    classes: list[int], data: st.DataObject
) -> None:
    n = len(classes)
    codes = np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    w = perc_weights(np.asarray(classes), codes, 5)
    has = np.bincount(codes, minlength=5) > 0
    assert np.isfinite(w[has]).all() and (w[has] > 0).all() and np.isnan(w[~has]).all()


# ---- an unvalidated table with inf/NaN: refused, never ranked last ---------------------------

INJECTED = ("score", "x2", "entropy", "mc_class", "al_x1", "mc_y2", "al_y1_cal", "mc_class_vec")


@PROPERTY
@given(
    case=cases(),
    column=st.sampled_from(INJECTED),
    value=st.sampled_from((np.inf, -np.inf, np.nan)),
    data=st.data(),
)
def test_non_finite_values_are_refused_not_demoted(
    case: Case, column: str, value: float, data: st.DataObject
) -> None:
    n = case.predictions.num_rows
    assume(n > 0)
    row = data.draw(st.integers(0, n - 1))
    table = case.predictions  # set_column does not validate: as if read without the schema
    if column == "mc_class_vec":
        vectors = table[column].to_pylist()
        vectors[row] = [1.0, value, 2.0]
        new = pa.array(vectors, pa.list_(pa.float32()))
    else:
        values_ = np.asarray(table[column].to_numpy(), dtype=np.float32).copy()
        values_[row] = value
        new = pa.array(values_)
    bad = Case(
        table.set_column(table.schema.get_field_index(column), column, new),
        case.images,
        case.candidates,
        case.n_det,
    )
    with pytest.raises(DataError):  # the contract refuses it when it is read
        schema.validate_table(bad.predictions, schema.PREDICTIONS)
    for score in SCORES:
        for mods in ({}, {"calib": True, "perc": True, "aggregation": "mean"}):
            try:
                _check_selection(bad, _spec(score, **mods), budget=2)
            except (MissingColumnError, NonFiniteColumnError) as err:
                assert err.column == column
