"""Score registry: contract tests over every registered score, and known answers (§9.3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from detloop.data import schema
from detloop.data.synthetic import predictions_from_rows, synthetic_predictions
from detloop.selectors.columns import DetColumns, MissingColumnError, NonFiniteColumnError
from detloop.selectors.scores import (
    ScoreContext,
    get_score,
    list_scores,
    register_score,
    registered_scores,
)
from detloop.selectors.strategy import StrategyError

THRESHOLDS = {"uncertainties": ["entropy", "albox_rel"], "weights": [0.7, 0.3]}
#: Scores with one value per candidate image (``random``); every other one gives one per row.
IMAGE_SCORES = [n for n in registered_scores() if get_score(n).kind == "image"]
CONTRACT_SCORES = [
    *(n for n in registered_scores() if n not in IMAGE_SCORES),
    "score",
    "al_x1",
    "entropy_cal",
    "mc_y2",
]
_UNCERTAIN = ("entropy", "mc_class", *schema.AL_COLS, *schema.MC_COLS)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    preds, _ = synthetic_predictions(40, 200, np.random.default_rng(3), n_classes=4)
    return preds


def _ctx(seed: int = 0, norm: bool = False) -> ScoreContext:
    return ScoreContext(rng=np.random.default_rng(seed), thresholds=THRESHOLDS, norm=norm)


def _per_row(values: np.ndarray) -> np.ndarray:
    return values if values.ndim == 1 else values.reshape(len(values), -1)


@pytest.mark.parametrize("name", CONTRACT_SCORES)
def test_one_finite_value_per_row(name: str, table: pa.Table) -> None:
    for norm in (False, True):
        values = get_score(name).fn(DetColumns(table), _ctx(norm=norm))
        assert len(values) == table.num_rows
        assert np.isfinite(values).all()
        info = get_score(name)
        assert (values.ndim == 2) == (info.kind == "vector")
        if info.kind == "vector":
            assert values.shape[1] == len(info.components)


@pytest.mark.parametrize("name", IMAGE_SCORES)
def test_image_scores_give_one_seeded_value_per_candidate(name: str, table: pa.Table) -> None:
    def run(seed: int) -> np.ndarray:
        ctx = ScoreContext(rng=np.random.default_rng(seed), n_images=13)
        return get_score(name).fn(DetColumns(table), ctx)

    a = run(7)
    assert a.shape == (13,) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, run(7))
    assert not np.array_equal(a, run(8))
    with pytest.raises(ValueError, match="n_images"):
        get_score(name).fn(DetColumns(table), _ctx())


@pytest.mark.parametrize("name", CONTRACT_SCORES)
def test_missing_column_is_named(name: str, table: pa.Table) -> None:
    info = get_score(name)
    for column in info.columns:
        if column == "image_id":
            continue
        without = table.drop_columns([column])
        with pytest.raises(MissingColumnError) as err:
            info.fn(DetColumns(without), _ctx())
        assert err.value.column == column and repr(column) in str(err.value)


@pytest.mark.parametrize("name", CONTRACT_SCORES)
def test_row_order_invariance(name: str, table: pa.Table) -> None:
    perm = np.random.default_rng(1).permutation(table.num_rows)
    shuffled = table.take(pa.array(perm))
    a = get_score(name).fn(DetColumns(table), _ctx(norm=True))
    b = get_score(name).fn(DetColumns(shuffled), _ctx(norm=True))
    np.testing.assert_allclose(_per_row(a)[perm], _per_row(b), rtol=1e-12)


@pytest.mark.parametrize("name", CONTRACT_SCORES)
def test_determinism_for_fixed_generator(name: str, table: pa.Table) -> None:
    a = get_score(name).fn(DetColumns(table), _ctx(seed=7))
    b = get_score(name).fn(DetColumns(table), _ctx(seed=7))
    np.testing.assert_array_equal(a, b)


def test_calib_reads_the_twin_columns(table: pa.Table) -> None:
    plain = get_score("entropy").fn(DetColumns(table), _ctx())
    cal = get_score("entropy").fn(DetColumns(table, calib=True), _ctx())
    np.testing.assert_allclose(cal, table["entropy_cal"].to_numpy().astype(np.float64))
    assert not np.allclose(plain, cal)
    without = table.drop_columns(["entropy_cal"])
    with pytest.raises(MissingColumnError, match=r"entropy_cal.*calibrate first"):
        get_score("entropy").fn(DetColumns(without, calib=True), _ctx())


def test_null_head_names_the_column() -> None:
    preds = predictions_from_rows([{"image_id": "a"}])
    cols = {
        c: pa.nulls(1, pa.float32()) if c.startswith("al_") else preds[c]
        for c in preds.column_names
    }
    nulls = schema.validate_table(pa.table(cols), schema.PREDICTIONS)
    with pytest.raises(MissingColumnError, match=r"'al_x1' is null.*loss attenuation"):
        get_score("albox").fn(DetColumns(nulls), _ctx())


def test_albox_and_norm_known_answers() -> None:
    preds = predictions_from_rows(
        [
            # 20 wide, 10 high: stds (2, 1, 4, 3) px
            {
                "image_id": "a",
                "x2": 20.0,
                "y2": 10.0,
                "al_x1": 2,
                "al_y1": 1,
                "al_x2": 4,
                "al_y2": 3,
            },
            {
                "image_id": "b",
                "x2": 100.0,
                "y2": 100.0,
                "al_x1": 8,
                "al_y1": 8,
                "al_x2": 8,
                "al_y2": 8,
            },
        ]
    )
    pixels = get_score("albox").fn(DetColumns(preds), _ctx())
    np.testing.assert_allclose(pixels, [2.5, 8.0])
    rel = get_score("albox").fn(DetColumns(preds), _ctx(norm=True))
    np.testing.assert_allclose(rel, [(2 / 20 + 1 / 10 + 4 / 20 + 3 / 10) / 4, 0.08])
    # b is the most uncertain in pixels, a relative to its size
    assert pixels.argmax() == 1 and rel.argmax() == 0


def test_entropy_and_combo_known_answers() -> None:
    preds = predictions_from_rows(
        [{"image_id": "a", "entropy": 1.0, "al_x1": 2.0}, {"image_id": "b", "entropy": 0.2}]
    )
    np.testing.assert_allclose(get_score("entropy").fn(DetColumns(preds), _ctx()), [1.0, 0.2])
    combo = get_score("combo").fn(DetColumns(preds), _ctx())
    rel_a = (2 / 10 + 1 / 10 + 1 / 10 + 1 / 10) / 4
    np.testing.assert_allclose(combo, [0.7 * 1.0 + 0.3 * rel_a, 0.7 * 0.2 + 0.3 * 0.1])
    with pytest.raises(ValueError, match="thresholding result"):
        get_score("combo").fn(DetColumns(preds), ScoreContext())


def test_list_column_is_averaged() -> None:
    preds = predictions_from_rows([{"image_id": "a"}, {"image_id": "b"}])
    logits = pa.array([[1.0, 3.0], [0.0, 4.0, 8.0]], pa.list_(pa.float32()))
    preds = preds.set_column(preds.schema.get_field_index("logits"), "logits", logits)
    np.testing.assert_allclose(get_score("logits").fn(DetColumns(preds), _ctx()), [2.0, 4.0])


def test_registry_listing_and_errors() -> None:
    names = {s.name for s in list_scores("*box")}
    assert names == {"albox", "mcbox"}
    assert {s.name for s in list_scores("al_*", include_columns=True)} >= {"al_x1", "al_y2_cal"}
    with pytest.raises(StrategyError, match="unknown score"):
        get_score("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_score("entropy", description="again")(lambda c, x: c.get("entropy"))


def _unvalidated(column: str, values: list[float]) -> pa.Table:
    """A predictions table holding ``values`` in ``column``, as if read without the schema."""
    preds = predictions_from_rows([{"image_id": f"i{k}"} for k in range(len(values))])
    idx = preds.schema.get_field_index(column)
    return preds.set_column(idx, column, pa.array(values, pa.float32()))


def test_inf_is_refused_with_the_column_and_count() -> None:
    inf = float("inf")
    table = _unvalidated("mc_y1", [1.0, inf, 2.0, -inf, inf])
    with pytest.raises(NonFiniteColumnError) as err:
        get_score("mcbox").fn(DetColumns(table), _ctx())
    assert (err.value.column, err.value.count, err.value.row) == ("mc_y1", 3, 1)
    assert "'mc_y1' holds 3 infinite values (first at row 1)" in str(err.value)
    # only the kept rows count; NaN (or null) stays a missing value
    kept = DetColumns(table, rows=np.array([0, 2]))
    np.testing.assert_allclose(kept.get("mc_y1"), [1.0, 2.0])
    with pytest.raises(NonFiniteColumnError, match="1 infinite value "):
        DetColumns(table, rows=np.array([0, 3])).get("mc_y1")
    nan = _unvalidated("entropy", [0.1, float("nan")])
    with pytest.raises(MissingColumnError, match="'entropy' is null or NaN at row 1"):
        get_score("entropy").fn(DetColumns(nan), _ctx())


def test_list_column_with_an_inf_element_is_refused() -> None:
    preds = predictions_from_rows([{"image_id": "a"}, {"image_id": "b"}])
    vec = pa.array([[1.0, 2.0], [0.5, float("inf")]], pa.list_(pa.float32()))
    preds = preds.set_column(preds.schema.get_field_index("mc_class_vec"), "mc_class_vec", vec)
    with pytest.raises(NonFiniteColumnError) as err:
        get_score("mc_class_vec").fn(DetColumns(preds), _ctx())
    assert (err.value.column, err.value.row) == ("mc_class_vec", 1)


_BIG_WEIGHTS = {"uncertainties": ["entropy", "albox"], "weights": [1e3, 1e3]}


def test_float32_extremes_stay_finite_in_every_score() -> None:
    big = float(np.finfo(np.float32).max)
    rows = [
        {"image_id": "a", "x2": 0.0, "y2": 1e-30, **{c: big for c in _UNCERTAIN}},
        {"image_id": "b", "x2": big, "y2": big, **{c: 1e-30 for c in _UNCERTAIN}},
        {"image_id": "c", **{c: 0.0 for c in _UNCERTAIN}},
    ]
    cols = DetColumns(predictions_from_rows(rows, calibrated=True))
    for name in CONTRACT_SCORES:
        for norm in (False, True):
            ctx = ScoreContext(thresholds=_BIG_WEIGHTS, norm=norm)
            values = get_score(name).fn(cols.with_calib(name.endswith("_cal")), ctx)
            assert np.isfinite(values).all(), (name, norm)


def test_combo_refuses_non_finite_weights() -> None:
    preds = predictions_from_rows([{"image_id": "a"}])
    thr = {"uncertainties": ["entropy"], "weights": [float("nan")]}
    with pytest.raises(ValueError, match="weights must be finite"):
        get_score("combo").fn(DetColumns(preds), ScoreContext(thresholds=thr))
