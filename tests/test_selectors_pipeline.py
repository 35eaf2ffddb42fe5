"""Selection pipeline and budgets: known answers on hand-built tables (§9.1, §9.4)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from detloop.data import schema
from detloop.data.synthetic import (
    image_ids,
    predictions_from_rows,
    synthetic_images,
    synthetic_predictions,
)
from detloop.selectors import pipeline
from detloop.selectors.budgets import iteration_sizes, loop_budgets, rescale_budgets
from detloop.selectors.columns import MIN_BOX_SIZE
from detloop.selectors.pipeline import SelectContext, select
from detloop.selectors.stages import aggregate, fuse, min_max, order_images, perc_weights, z_score
from detloop.selectors.strategy import parse_strategy


def _images(ids: list[str]) -> pa.Table:
    return synthetic_images(pa.array(ids, pa.string()))


def _ctx(seed: int = 0, **kw: object) -> SelectContext:
    return SelectContext(rng=np.random.default_rng(seed), **kw)  # type: ignore[arg-type]


def _selected(table: pa.Table) -> list[str]:
    return sorted(table.filter(table["selected"])["image_id"].to_pylist())


def _ranked(table: pa.Table) -> list[str]:
    return table.sort_by("rank")["image_id"].to_pylist()


# ---- budgets ---------------------------------------------------------------------------------


def test_budgets_kitti_pool() -> None:
    sizes = iteration_sizes(5985, [5, 5, 5, 10, 20, 30, 25])
    assert sizes == [299, 299, 299, 598, 1197, 1795, 1498]
    assert sum(sizes) == 5985


def test_budgets_decimal_exact_and_partial() -> None:
    # 0.1 % of 10 000 is exactly 10 (a float product would give 9.999…)
    assert iteration_sizes(10_000, [0.1, 0.1]) == [10, 10]
    assert iteration_sizes(101, [50, 40]) == [50, 40]
    with pytest.raises(ValueError, match="more than the whole pool"):
        iteration_sizes(10, [60, 50])


def test_budget_rescaling_hand_example() -> None:
    # 100 images, 20 pruned: each entry × 1.25, kept while the cumulative sum stays ≤ 100
    out = rescale_budgets([5, 5, 5, 10, 20, 30, 25], 100, 80)
    assert out == [6.25, 6.25, 6.25, 12.5, 25.0, 37.5]
    # the iterations still end at 5, 10, 15, 25, 45, 75 % of the original pool
    cumulative = np.cumsum(iteration_sizes(80, out))
    assert cumulative.tolist() == [5, 10, 15, 25, 45, 75]
    assert loop_budgets(parse_strategy("full_prune_entropy"), [5, 5], 100, 80) == [100.0]
    assert loop_budgets(parse_strategy("entropy"), [5, 5], 100, 80) == [5.0, 5.0]


# ---- stages ----------------------------------------------------------------------------------


def test_nee_bins_known_answer() -> None:
    scores = np.arange(1, 31, dtype=np.float64)
    rng = np.random.default_rng(0)
    rank, selected = order_images(scores, np.ones(30, bool), "nee", 12, rng)
    assert sorted(scores[selected].astype(int).tolist()) == [
        5, 6, 11, 12, 17, 18, 23, 24, 25, 26, 27, 28,
    ]  # fmt: skip
    assert sorted(rank.tolist()) == list(range(30))


def test_perc_weights_known_answer() -> None:
    # car ×6, pedestrian ×3, cyclist ×1 over three images; image 0 has {car, cyclist}
    classes = np.array([0, 0, 2, 0, 0, 1, 1, 1, 0, 0])
    codes = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    w = perc_weights(classes, codes, 4)
    np.testing.assert_allclose(
        w[:3], [(10 / 6 + 10) / 2, (10 / 6 + 10 / 3) / 2, (10 / 3 + 10 / 6) / 2]
    )
    assert round(w[0], 3) == 5.833 and np.isnan(w[3])


def test_fusion_hand_example_with_constant_component() -> None:
    # components (rel(mc), rel(al), mc_class); the last one is constant → scales to 0
    comp = np.array([[0.0, 1.0, 5.0], [1.0, 3.0, 5.0], [2.0, 2.0, 5.0]])
    np.testing.assert_allclose(fuse(comp, "sum"), [0.0 + 0.0, 0.5 + 1.0, 1.0 + 0.5])
    np.testing.assert_allclose(fuse(comp, "highep_lowal"), [0.0 - 0.0, 0.5 - 1.0, 1.0 - 0.5])
    z0 = (comp[:, 0] - 1.0) / np.sqrt(2 / 3)
    z1 = (comp[:, 1] - 2.0) / np.sqrt(2 / 3)
    np.testing.assert_allclose(fuse(comp, "sota"), np.maximum(np.maximum(z0, z1), 0.0))


def test_aggregate_max_mean_and_split_runs() -> None:
    values = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    codes = np.array([0, 0, 2, 0, 2])  # image 0 split over two runs, image 1 without rows
    np.testing.assert_allclose(aggregate(values, codes, 3, "max"), [5.0, np.nan, 4.0])
    np.testing.assert_allclose(aggregate(values, codes, 3, "mean"), [3.0, np.nan, 3.0])
    vec = np.stack([values, -values], axis=1)
    np.testing.assert_allclose(aggregate(vec, codes, 3, "max")[0], [5.0, -1.0])


# ---- select() --------------------------------------------------------------------------------


def _entropy_rows(per_image: dict[str, list[float]]) -> pa.Table:
    return predictions_from_rows(
        [{"image_id": i, "entropy": e} for i, es in per_image.items() for e in es]
    )


def test_entropy_ranking_max_vs_mean_and_bottomk() -> None:
    preds = _entropy_rows({"a": [0.9, 0.1, 0.1], "b": [0.6, 0.6], "c": [0.2], "d": [0.5]})
    images = _images(["a", "b", "c", "d"])
    top = select(preds, images, "entropy", 2, _ctx())
    assert _ranked(top) == ["a", "b", "d", "c"] and _selected(top) == ["a", "b"]
    mean = select(preds, images, "mean_entropy", 2, _ctx())
    assert _ranked(mean) == ["b", "d", "a", "c"]
    bottom = select(preds, images, "bottomk_entropy", 1, _ctx())
    assert _selected(bottom) == ["c"]
    assert top["strategy"].to_pylist() == ["entropy"] * 4
    assert mean.sort_by("rank")["score"].to_pylist()[0] == pytest.approx(0.6)


def test_ties_by_image_id_and_sota_highep_lowal() -> None:
    preds = _entropy_rows({"b": [0.5], "a": [0.5], "c": [0.5]})
    assert _ranked(select(preds, _images(["c", "b", "a"]), "entropy", 1, _ctx())) == ["a", "b", "c"]
    rows = [
        {"image_id": "a", "mc_x1": 0.0, "al_x1": 10.0, "mc_class": 0.1},
        {"image_id": "b", "mc_x1": 10.0, "al_x1": 30.0, "mc_class": 0.1},
        {"image_id": "c", "mc_x1": 20.0, "al_x1": 20.0, "mc_class": 0.1},
    ]
    preds = predictions_from_rows(rows)
    images = _images(["a", "b", "c"])
    sota = select(preds, images, "sota", 1, _ctx())
    comps = np.array(sota.sort_by("image_id")["components"].to_pylist())
    expected = fuse(comps, "sota")
    np.testing.assert_allclose(sota.sort_by("image_id")["score"].to_numpy(), expected)
    hl = select(preds, images, "highep_lowal", 1, _ctx())
    assert _selected(hl) == ["c"] and hl["strategy"][0].as_py() == "highep_lowal_alluncert"
    assert _selected(select(preds, images, "alluncert", 1, _ctx())) == ["b"]


def test_perc_selection_known_answer() -> None:
    # same entropy everywhere; the image with the rare class wins under perc
    rows = [{"image_id": "a", "class_id": 0}] * 3 + [{"image_id": "b", "class_id": 1}]
    preds = predictions_from_rows(rows)
    images = _images(["a", "b"])
    table = select(preds, images, "perc_entropy", 1, _ctx())
    assert _selected(table) == ["b"]
    scores = dict(zip(table["image_id"].to_pylist(), table["score"].to_pylist(), strict=True))
    assert scores["a"] == pytest.approx(0.5 * 4 / 3) and scores["b"] == pytest.approx(0.5 * 4)


def test_unscored_images_rank_last_and_fill_seeded() -> None:
    preds = predictions_from_rows(
        [
            {"image_id": "a", "entropy": 0.3},
            {"image_id": "b", "entropy": 0.9, "score": 0.4},  # exactly min_score: ignored
            {"image_id": "c", "entropy": 0.1, "score": 0.2},
        ]
    )
    images = _images(["a", "b", "c", "d", "e"])
    table = select(preds, images, "entropy", 3, _ctx(seed=5, min_score=0.4))
    ranked = _ranked(table)
    assert ranked[0] == "a"
    assert set(ranked[1:]) == {"b", "c", "d", "e"}
    assert table.filter(pc.equal(table["image_id"], "a"))["n_det"][0].as_py() == 1
    assert table.filter(pc.is_null(table["score"])).num_rows == 4
    assert sum(table["selected"].to_pylist()) == 3
    again = select(preds, images, "entropy", 3, _ctx(seed=5, min_score=0.4))
    assert again.equals(table)
    assert _selected(select(preds, images, "entropy", 1, _ctx(seed=6))) == ["a"]


def test_non_candidates_are_ignored() -> None:
    preds = _entropy_rows({"a": [0.9], "b": [0.1], "x": [1.0]})
    images = _images(["a", "b", "x"])
    state = pa.array(["unlabeled", "unlabeled", "labeled"])
    images = images.set_column(images.schema.get_field_index("state"), "state", state)
    table = select(preds, images, "entropy", 1, _ctx())
    assert table.num_rows == 2 and _selected(table) == ["a"]


def test_random_is_seeded_and_covers_images_without_detections() -> None:
    preds = _entropy_rows({"a": [0.9]})
    images = _images([f"i{k}" for k in range(50)] + ["a"])
    a = select(preds, images, "random", 10, _ctx(seed=1))
    b = select(preds, images, "random", 10, _ctx(seed=1))
    c = select(preds, images, "random", 10, _ctx(seed=2))
    assert a.equals(b) and _selected(a) != _selected(c)
    assert a.filter(pc.is_null(a["score"])).num_rows == 0


def test_combo_needs_thresholds() -> None:
    preds = _entropy_rows({"a": [0.9], "b": [0.1]})
    thr = {"uncertainties": ["entropy"], "weights": [1.0]}
    table = select(preds, _images(["a", "b"]), "combo", 1, _ctx(thresholds=thr))
    assert _selected(table) == ["a"]
    with pytest.raises(ValueError, match="thresholding result"):
        select(preds, _images(["a", "b"]), "combo", 1, _ctx())


@pytest.mark.parametrize(
    "name", ["entropy", "perc_calib_norm_mean_albox", "alluncert", "sota", "nee_entropy", "ental"]
)
def test_selection_table_contract_and_row_order(name: str) -> None:
    preds, images = synthetic_predictions(300, 2000, np.random.default_rng(4), n_classes=5)
    table = select(preds, images, name, 30, _ctx(seed=3))
    schema.validate_table(table, schema.SELECTION)
    assert table.num_rows == 300 and sum(table["selected"].to_pylist()) == 30
    assert table["rank"].to_pylist() == list(range(300))
    assert set(table["strategy"].to_pylist()) == {parse_strategy(name).name}
    shuffled = preds.take(pa.array(np.random.default_rng(9).permutation(preds.num_rows)))
    again = select(shuffled, images, name, 30, _ctx(seed=3))
    assert _selected(again) == _selected(table)


def test_image_ids_sort_like_numbers() -> None:
    ids = image_ids(1001).to_pylist()
    assert ids == sorted(ids) and ids[0] == "pool/img_0000"


def test_empty_predictions_and_empty_pool() -> None:
    images = synthetic_images(image_ids(20))
    empty = schema.PREDICTIONS.empty()
    warmup = select(empty, images, "random", 5, _ctx(seed=1))  # iteration 0: no model yet
    assert sum(warmup["selected"].to_pylist()) == 5 and warmup["score"].null_count == 0
    for name in ("entropy", "perc_entropy", "nee_alluncert"):
        table = select(empty, images, name, 5, _ctx(seed=1))
        assert sum(table["selected"].to_pylist()) == 5 and table["score"].null_count == 20
    assert select(empty, images.slice(0, 0), "entropy", 5, _ctx()).num_rows == 0
    with pytest.raises(ValueError, match="budget"):
        select(empty, images, "entropy", -1, _ctx())


# ---- edge cases: defined results, never a non-finite score (issue 11) ---------------------------


def test_constant_components_scale_to_exactly_zero() -> None:
    # the float mean of three 0.1 is 0.1 + 1.4e-17: std > 0 would give z = -1 everywhere
    comp = np.array([[0.0, 0.1, 3e38], [1.0, 0.1, 3e38], [2.0, 0.1, 3e38]])
    np.testing.assert_array_equal(z_score(comp)[:, 1:], 0.0)
    np.testing.assert_array_equal(min_max(comp)[:, 1:], 0.0)
    np.testing.assert_allclose(fuse(comp, "sota"), z_score(comp[:, :1])[:, 0].clip(0.0))
    one = np.array([[5.0, 1e-30, 3e38]])  # a single scored image is constant in every component
    for fusion in ("sum", "highep_lowal", "sota"):
        np.testing.assert_array_equal(fuse(one, fusion), [0.0])  # type: ignore[arg-type]
    assert fuse(np.zeros((0, 3)), "sum").shape == (0,)


def test_single_image_and_single_detection() -> None:
    preds = predictions_from_rows([{"image_id": "a", "mc_x1": 7.0}])
    for name in ("alluncert", "sota", "highep_lowal", "perc_nee_mean_entropy", "norm_mcbox"):
        table = select(preds, _images(["a"]), name, 1, _ctx())
        assert _selected(table) == ["a"] and np.isfinite(table["score"][0].as_py()), name
    assert select(preds, _images(["a"]), "alluncert", 1, _ctx())["score"][0].as_py() == 0.0


@pytest.mark.parametrize("name", ["entropy", "bottomk_entropy", "nee_entropy", "sota", "ental"])
def test_all_equal_scores_rank_by_image_id(name: str) -> None:
    ids = ["e", "b", "d", "a", "c", "f"]
    preds = predictions_from_rows([{"image_id": i} for i in ids for _ in range(2)])
    table = select(preds, _images(ids), name, 2, _ctx())
    assert set(table["score"].to_pylist()) == {table["score"][0].as_py()}
    if name.startswith("nee"):
        # nee bins the (score, image_id) ascending order: with all scores equal its last bin
        # holds the last ids; its picks come first, then the rest by image_id
        assert _ranked(table) == ["e", "f", "a", "b", "c", "d"]
    else:
        assert _ranked(table) == sorted(ids) and _selected(table) == ["a", "b"]


def test_zero_size_boxes_divide_by_the_size_floor() -> None:
    rows = [
        {"image_id": "a", "x2": 0.0, "y2": 0.0, "al_x1": 1.0},  # zero-size: std / MIN_BOX_SIZE
        {"image_id": "b", "x2": 3e38, "y2": 3e38, "al_x1": 3e38},
    ]
    table = select(predictions_from_rows(rows), _images(["a", "b"]), "norm_albox", 2, _ctx())
    scores = dict(zip(table["image_id"].to_pylist(), table["score"].to_pylist(), strict=True))
    assert scores["a"] == pytest.approx(1.0 / MIN_BOX_SIZE)
    assert np.isfinite(scores["b"]) and _ranked(table) == ["a", "b"]


def test_a_non_finite_image_score_is_refused_with_the_strategy_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    preds = _entropy_rows({"a": [0.9], "b": [0.1], "c": [0.5]})
    real = pipeline.aggregate

    def broken(values: np.ndarray, codes: np.ndarray, n: int, how: str) -> np.ndarray:
        out = real(values, codes, n, how)
        out[:2] = [np.nan, np.inf]  # as min_max of an inf component once gave
        return out

    monkeypatch.setattr(pipeline, "aggregate", broken)
    with pytest.raises(ValueError, match=r"'mean_entropy': 2 of 3 scored images got a non-finite"):
        select(preds, _images(["a", "b", "c"]), "mean_entropy", 1, _ctx())
