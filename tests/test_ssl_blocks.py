"""SSL building blocks, pure parts (ALGORITHMS §11.4 RCF, §11.5 GLC, §11.7 PLS, §11.8 3D study,
§11.9 CSD schedule): known answers and the pins (e), (g), (h), (i: ramp and split), (j)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from detloop.data import schema
from detloop.data.labels import box_rows, labels_from_boxes
from detloop.data.synthetic import predictions_from_rows
from detloop.selectors.pseudo import pls_scores
from detloop.selectors.ssl_3d import (
    VARIANTS,
    greedy_match,
    greedy_match_at,
    match_pseudo_to_gt,
    oracle_variant,
)
from detloop.selectors.ssl_csd import csd_ramp, csd_split
from detloop.selectors.ssl_glc import GlcParams, glc_correct, reference_match
from detloop.selectors.ssl_glc_stress import StressParams, corrupt_labels, glc_recovery
from detloop.selectors.ssl_pls import (
    drate,
    drate_drops,
    missing_rate,
    pls_aucs,
    pls_d,
    pls_keep,
    rarity,
    roc_auc,
    survival_share,
)
from detloop.selectors.ssl_rcf import (
    class_counts,
    class_weights,
    curriculum_batches,
    curriculum_split,
    image_scores,
    object_weights,
)

# ---- RCF (§11.4) ------------------------------------------------------------------------------


def test_rcf_class_weights_pin_e() -> None:
    assert class_weights({0: 100, 1: 10, 2: 1}, 1.0, 10.0) == pytest.approx({0: 1, 1: 10, 2: 10})


def test_rcf_class_weights_known_answers() -> None:
    # a = (1/4, 1/2, 1)/ln 10 → min-max (0, 1/3, 1) → [1, 10]: 1, 4, 10
    assert class_weights({0: 10_000, 1: 100, 2: 10}) == pytest.approx({0: 1, 1: 4, 2: 10})
    assert class_weights({0: 5, 1: 5}, 1, 30) == {0: 1, 1: 1}  # all a_c equal → lowest
    assert class_weights({0: 7, 1: 0, 2: 1}, 1, 30) == {0: 1, 1: 30, 2: 30}  # n ≤ 1 → highest
    assert class_weights({}) == {}
    with pytest.raises(ValueError, match="lowest"):
        class_weights({0: 3}, 5, 1)


def _labels(rows: list[tuple[str, int]]) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.string()),
            "class_id": pa.array([r[1] for r in rows], pa.int32()),
        }
    )


def test_rcf_counts_object_weights_and_image_scores() -> None:
    labels = _labels([("a", 0), ("a", 1), ("b", 2), ("x", 0)])
    assert class_counts(labels, classes=range(4)) == {0: 2, 1: 1, 2: 1, 3: 0}
    weights = {0: 1.0, 1: 10.0, 2: 10.0}
    np.testing.assert_allclose(object_weights([0, 2, 1], weights), [1, 10, 10])
    # a: mean(1, 10); b: 10; c has no object → 0; "x" is not asked for
    np.testing.assert_allclose(image_scores(labels, weights, ["a", "b", "c"]), [5.5, 10, 0])
    with pytest.raises(ValueError, match=r"class ids \[3\]"):
        object_weights([3], weights)


def test_rcf_split_top_n_over_b_ties_by_image_id() -> None:
    ids = [f"i{k}" for k in range(10)]
    scores = [1, 5, 3, 5, 2, 9, 1, 1, 1, 1]
    rare, common = curriculum_split(ids, scores, batch_size=4)  # ⌊10/4⌋ = 2 rare
    assert rare == ["i5", "i1"]  # 9, then 5 (i1 before i3 by id)
    assert common[:2] == ["i3", "i2"] and sorted(rare + common) == sorted(ids)
    assert curriculum_split(ids[:3], scores[:3], 4) == ([], ["i1", "i2", "i0"])
    with pytest.raises(ValueError, match="scores"):
        curriculum_split(ids, scores[:3], 4)


@pytest.mark.parametrize("aug", [False, True])
def test_rcf_each_batch_holds_exactly_one_rare_image(aug: bool) -> None:
    ids = [f"img{k:02d}" for k in range(40)]
    rare, common = curriculum_split(ids, np.arange(40.0), batch_size=8)
    assert len(rare) == 5 and len(common) == 35
    batches = curriculum_batches(rare, common, 8, seed=3, epoch=0, aug=aug)
    assert len(batches) == 5  # max(5 rare, ceil(35/7))
    rare_set = set(rare)
    for b in batches:
        assert len(b.common) == 7 and not set(b.common) & rare_set
        assert b.rare in rare_set
        assert sum(i in rare_set for i in [*b.common, b.rare]) == 1
        assert len(b.augmented) == (2 if aug else 0) and set(b.augmented) <= rare_set
        assert len(b.image_ids) == (10 if aug else 8)
    assert sorted(i for b in batches for i in b.common) == sorted(common)  # one pass each
    assert sorted(str(b.rare) for b in batches) == sorted(rare)
    again = curriculum_batches(rare, common, 8, seed=3, epoch=0, aug=aug)
    assert again == batches
    assert curriculum_batches(rare, common, 8, seed=3, epoch=1, aug=aug) != batches


def test_rcf_batches_cycle_the_shorter_stream_and_edge_cases() -> None:
    rare, common = ["r0", "r1"], [f"c{k:02d}" for k in range(20)]
    batches = curriculum_batches(rare, common, 4, seed=0, epoch=0)
    assert len(batches) == 7  # ceil(20/3) common batches; the 2 rare images cycle
    assert Counter(b.rare for b in batches) in (Counter(r0=4, r1=3), Counter(r0=3, r1=4))
    assert set(i for b in batches for i in b.common) == set(common)
    assert len(curriculum_batches(rare, common, 4, 0, 0, steps=2)) == 2
    only_rare = curriculum_batches(rare, common, 1, seed=0, epoch=0)  # STAC L = 1
    assert [b.common for b in only_rare] == [(), ()]
    plain = curriculum_batches([], common[:5], 2, seed=0, epoch=0)
    assert [len(b.common) for b in plain] == [2, 2, 2] and all(b.rare is None for b in plain)


# ---- PLS (§11.7) ------------------------------------------------------------------------------


def test_pls_drate_s_and_drops_known_answer() -> None:
    d = drate([[0.9, 0.5, 0.2, 0.1], np.array([0.4, 0.3], np.float32), []])
    np.testing.assert_array_equal(d[0], [4, 4, 3, 2, 2, 2, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(d[1], [2, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0])  # float32 0.4 ≥ 0.4
    np.testing.assert_array_equal(d[2], np.zeros(11))
    np.testing.assert_allclose(survival_share(d, 0.4), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(survival_share(d, 0.3), [0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="δ_S"):
        survival_share(d, 0.45)
    drops = drate_drops(d[:1])  # drops 0,1,1,0,0,1,0,0,0,1
    assert drops["max"][0] == 1 and drops["mean"][0] == pytest.approx(0.4)
    assert drops["std"][0] == pytest.approx(math.sqrt(0.24))


def test_pls_c_and_d_agree_with_pls_scores() -> None:
    scores = {"a": [0.9, 0.5, 0.2, 0.1], "b": [0.8, 0.7], "c": [0.95, 0.3, 0.2, 0.15], "d": [0.6]}
    teacher = predictions_from_rows(
        [{"image_id": i, "score": s} for i, ss in scores.items() for s in ss]
    )
    # pseudo-labels: a {0, 0}, b {0, 1}, c {0}, d {1}: class shares 4/6 and 2/6
    img, cls = np.array([0, 0, 1, 1, 2, 3]), np.array([0, 0, 0, 1, 0, 1])
    s = survival_share(drate(list(scores.values())), 0.4)
    c = rarity(img, cls, 4)
    r0, r1 = 1 - 4 / 6, 1 - 2 / 6
    np.testing.assert_allclose(s, [0.5, 1.0, 0.25, 1.0])
    np.testing.assert_allclose(c, [r0, (r0 + r1) / 2, r0, r1])
    np.testing.assert_allclose(pls_d(s, c, 0.1), 0.9 * s + 0.1 * c)
    pseudo = pa.table({"image_id": list("aabbcd"), "class_id": pa.array(cls, pa.int32())})
    table = pls_scores(teacher, pseudo, tau=0.4, beta=0.1)
    np.testing.assert_allclose(table["D"].to_numpy(), pls_d(s, c))
    np.testing.assert_allclose(rarity(np.zeros(0), np.zeros(0), 2), [0, 0])


def test_pls_top_k_pin_g() -> None:
    # image k: 10 teacher detections, k + 1 of them at 0.9 (the pseudo-labels), the rest 0.2,
    # so S_k = (k + 1)/10; every pseudo-label is class 0 except image 0's (class 1): C_0 = 54/55,
    # C_k = 1/55. Names scrambled so the top is not the last ids.
    names = ["h", "c", "j", "a", "f", "b", "i", "e", "g", "d"]
    scores = [[0.9] * (k + 1) + [0.2] * (9 - k) for k in range(10)]
    img = np.repeat(np.arange(10), np.arange(1, 11))
    cls = (img == 0).astype(int)
    s = survival_share(drate(scores), 0.4)
    c = rarity(img, cls, 10)
    d = pls_d(s, c, 0.1)
    np.testing.assert_allclose(s, np.arange(1, 11) / 10)
    np.testing.assert_allclose(c, [54 / 55, *[1 / 55] * 9])
    assert d[0] == pytest.approx(0.9 * 0.1 + 0.1 * 54 / 55)
    assert d[9] == pytest.approx(0.9 + 0.1 / 55)
    kept = pls_keep(names, d, top_k=0.4)
    assert kept == sorted(names[6:])  # the 4 highest D: images 6 … 9
    assert pls_keep(names, d, 0.4, "bot") == sorted(names[:6])
    rand = pls_keep(names, d, 0.4, "rand", seed=1)
    assert len(rand) == 4 and rand == pls_keep(names, d, 0.4, "rand", seed=1)
    assert len(pls_keep(names, d, 0.35)) == 4 and len(pls_keep(names, d, 0.3)) == 3
    tied = pls_keep(["b", "a", "c"], [0.5, 0.5, 0.1], top_k=0.2)  # ceil(0.6) = 1: tie → "a"
    assert tied == ["a"]


def test_roc_auc_rank_formula_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    score = np.round(rng.random(200) + 0.5 * y, 1).astype(np.float64)  # many ties
    assert roc_auc(score, y) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_pls_aucs_against_missing_rates() -> None:
    rate = missing_rate([0, 1, 2, 3], [4, 4, 4, 0])  # image 3 has no GT → 0
    np.testing.assert_allclose(rate, [0, 0.25, 0.5, 0])
    out = pls_aucs({"S": np.array([0.9, 0.5, 0.1, 0.8])}, rate)
    assert out["S"][0.0] == 0.0  # S low exactly where something was missed
    assert out["S"][0.25] == 0.0 and math.isnan(out["S"][0.5]) and math.isnan(out["S"][0.75])


# ---- 3D study (§11.8) -------------------------------------------------------------------------


def _boxes(rows: list[tuple[str, int, list[float]]], score: list[float] | None = None) -> pa.Table:
    data: dict[str, pa.Array] = {
        "image_id": pa.array([r[0] for r in rows], pa.string()),
        "class_id": pa.array([r[1] for r in rows], pa.int32()),
    }
    coords = np.array([r[2] for r in rows], dtype=np.float32).reshape(-1, 4)
    data |= {c: pa.array(coords[:, k]) for k, c in enumerate(schema.COORDS)}
    if score is not None:
        data["det_id"] = pa.array(np.arange(len(rows)), pa.int32())
        data["score"] = pa.array(score, pa.float32())
        data["weight"] = pa.array(np.ones(len(rows)), pa.float32())
    return pa.table(data)


def _study() -> tuple[pa.Table, pa.Table]:
    gt = _boxes(
        [
            ("a", 0, [0, 0, 10, 10]),  # g0: p0 (IoU 1)
            ("a", 0, [20, 20, 30, 30]),  # g1: p2 (IoU 0.8)
            ("a", 1, [50, 50, 60, 60]),  # g2: missed (p3 has the wrong class)
            ("b", 0, [0, 0, 10, 10]),  # h0: q0 (IoU 0.6) before q1 (IoU 1) by score
            ("d", 0, [0, 0, 10, 10]),  # an image without pseudo-labels
        ]
    )
    pseudo = _boxes(
        [
            ("a", 0, [0, 0, 10, 10]),  # p0 .9
            ("a", 0, [0, 0, 10, 9]),  # p1 .8: IoU .9 with g0, taken → false detection
            ("a", 0, [20, 20, 30, 28]),  # p2 .7
            ("a", 0, [50, 50, 60, 60]),  # p3 .6 wrong class
            ("b", 0, [0, 0, 10, 6]),  # q0 .5
            ("b", 0, [0, 0, 10, 10]),  # q1 .4
            ("c", 0, [0, 0, 5, 5]),  # r0 .9, image without GT
        ],
        score=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.9],
    )
    return pseudo, gt


def test_3d_greedy_matching_hand_example() -> None:
    pseudo, gt = _study()
    m = match_pseudo_to_gt(pseudo, gt)
    assert m.image_ids == ["a", "b", "c"] and m.gt.num_rows == 4
    np.testing.assert_array_equal(m.gt_row, [0, -1, 1, -1, 3, -1, -1])
    np.testing.assert_allclose(m.iou, [1, 0, 0.8, 0, 0.6, 0, 0])
    np.testing.assert_array_equal(m.gt_matched, [True, True, False, True])
    assert m.images_with_misses() == {"a"}
    agnostic = match_pseudo_to_gt(pseudo, gt, class_aware=False)
    assert agnostic.gt_row[3] == 2 and agnostic.gt_matched.all()


def _greedy_reference(
    p_box: np.ndarray, score: np.ndarray, g_box: np.ndarray, thr: float, allowed: np.ndarray
) -> tuple[list[int], list[float]]:
    """The greedy matching written plainly: box by box in descending score (row order on ties),
    the free allowed gt box of highest IoU (first on ties) if that IoU ≥ thr."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
        return float(w * h / (area - w * h))

    gt_of, iou_of, free = [-1] * len(p_box), [0.0] * len(p_box), set(range(len(g_box)))
    for k in sorted(range(len(p_box)), key=lambda k: (-score[k], k)):
        cands = [(iou(p_box[k], g_box[j]), -j) for j in sorted(free) if allowed[k, j]]
        best = max(cands, default=(-1.0, 0))
        if best[0] >= thr:
            gt_of[k], iou_of[k] = -best[1], best[0]
            free.discard(-best[1])
    return gt_of, iou_of


def test_matching_at_several_thresholds_equals_one_matching_per_threshold() -> None:
    """``greedy_match_at`` runs the T matchings side by side: each row equals the plain greedy
    matching at that threshold alone (random boxes, tied scores, a class mask), and
    ``greedy_match`` is its one-threshold case."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        g = rng.uniform(0, 40, (6, 2))
        g_box = np.hstack([g, g + rng.uniform(5, 15, (6, 2))])
        p_box = g_box[rng.integers(0, 6, 25)] + rng.normal(0, 2.5, (25, 4))
        score = rng.choice([0.3, 0.5, 0.9], 25)  # ties: stable row order decides
        allowed = rng.random((25, 6)) < 0.7
        thr = (0.3, 0.5, 0.75, 0.9)
        gt_of, iou_of = greedy_match_at(p_box, score, g_box, thr, allowed)
        for t, iou_thr in enumerate(thr):
            j, v = _greedy_reference(p_box, score, g_box, iou_thr, allowed)
            np.testing.assert_array_equal(gt_of[t], j)
            np.testing.assert_allclose(iou_of[t], v, atol=1e-12)
        j, v = greedy_match(p_box, score, g_box, 0.5, allowed)
        np.testing.assert_array_equal(j, gt_of[1])


def _dets(table: pa.Table) -> list[int | None]:
    return list(table["det_id"].to_pylist())


def test_3d_variants_pin_h() -> None:
    pseudo, gt = _study()
    m = match_pseudo_to_gt(pseudo, gt)
    out = {v: oracle_variant(m, v) for v in VARIANTS}
    assert _dets(out["nofd"]) == [0, 2, 4]
    assert _dets(out["nomd"]) == [4, 5, 6]  # image a has the missed g2
    assert _dets(out["nomdfd"]) == [4]
    assert _dets(out["fixmd"]) == [0, 1, 2, 3, None, 4, 5, 6]
    added = out["fixmd"].filter(pa.array(np.array(out["fixmd"]["origin"].to_pylist()) == "gt"))
    assert added["class_id"].to_pylist() == [1] and added["x1"].to_pylist() == [50]
    assert added["score"].to_pylist() == [1] and added["weight"].to_pylist() == [1]
    assert _dets(out["highprec"]) == [0]
    nonoise = out["nonoise"]
    assert _dets(nonoise) == [0, 1, 2, 3, 4, 5, 6]
    assert nonoise["origin"].to_pylist()[:3] == ["gt_box", "pseudo", "gt_box"]
    assert nonoise["y2"].to_pylist()[2] == 30  # p2 [20,20,30,28] → g1 [20,20,30,30]
    assert nonoise["y2"].to_pylist()[4] == 6  # q0 matched at 0.6 < 0.75: unchanged
    assert nonoise.schema.field("y2").type == pa.float32()
    with pytest.raises(ValueError, match="variant"):
        oracle_variant(m, "nope")  # type: ignore[arg-type]


def test_3d_and_glc_on_empty_tables() -> None:
    pseudo, gt = _study()
    none = match_pseudo_to_gt(pseudo.slice(0, 0), gt)
    assert none.image_ids == [] and all(oracle_variant(none, v).num_rows == 0 for v in VARIANTS)
    no_gt = match_pseudo_to_gt(pseudo, gt.slice(0, 0))
    assert oracle_variant(no_gt, "nofd").num_rows == 0
    assert oracle_variant(no_gt, "fixmd").num_rows == pseudo.num_rows
    g, preds = _glc_case()
    assert glc_correct(g, preds.slice(0, 0)).counts()["mistakes"] == g.num_rows
    assert glc_correct(g.slice(0, 0), preds).counts()["md"] == 6
    assert glc_correct(g.slice(0, 0), preds.slice(0, 0)).labels.num_rows == 0


def test_3d_study_over_given_images_fixes_images_without_pseudo_labels() -> None:
    pseudo, gt = _study()
    m = match_pseudo_to_gt(pseudo, gt, image_ids=["a", "d"])
    assert m.pseudo.num_rows == 4 and m.images_with_misses() == {"a", "d"}
    fixmd = oracle_variant(m, "fixmd")
    assert fixmd["image_id"].to_pylist() == ["a"] * 5 + ["d"]
    assert oracle_variant(m, "nomd").num_rows == 0


# ---- GLC (§11.5) ------------------------------------------------------------------------------


def _glc_case() -> tuple[pa.Table, pa.Table]:
    gt = box_rows(
        ["a", "a", "a", "a", "b"],
        [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [0, 0, 10, 10]],
        [0, 1, 0, 0, 2],
        first_box_id=1,
    )  # box ids 1 … 5
    rows = [
        ("a", 0, [1, 0, 11, 10], 0.8, 0.95),  # G1's best (IoU 0.818): noisy → replaced
        ("a", 1, [20, 20, 30, 30], 0.3, 0.95),  # G2's: score < 0.4 → G2 kept
        ("a", 0, [60, 60, 70, 72], 0.9, 0.9),  # G4's: cons 0.9 is not > 0.9 → G4 kept
        ("a", 1, [80, 80, 90, 90], 0.5, 0.9),  # no GT overlap, cons ≥ 0.9 → md adds it
        ("a", 0, [80, 0, 90, 10], 0.6, 0.5),  # no overlap but cons 0.5 → not added
        ("a", 0, [5, 0, 15, 10], 0.7, 0.99),  # overlaps G1 (IoU 1/3) → not added
        ("c", 2, [0, 0, 8, 8], 0.2, 0.97),  # image without GT → md adds it
    ]  # G3 (no prediction overlaps) and G5 (image b has none) → removed by mistakes
    preds = predictions_from_rows(
        [
            {"image_id": i, "class_id": c, "score": s, **dict(zip(schema.COORDS, b, strict=True))}
            for i, c, b, s, _ in rows
        ]
    )
    preds = preds.append_column("cons_iou", pa.array([r[4] for r in rows], pa.float32()))
    return gt, schema.validate_table(preds, schema.PREDICTIONS)


def test_glc_reference_matching() -> None:
    gt, preds = _glc_case()
    best, best_iou, p_max = reference_match(gt, preds)
    np.testing.assert_array_equal(best, [0, 1, -1, 2, -1])
    np.testing.assert_allclose(best_iou, [90 / 110, 1, 0, 100 / 120, 0])
    np.testing.assert_allclose(p_max, [90 / 110, 1, 100 / 120, 0, 0, 1 / 3, 0])


def test_glc_rules_pin_j() -> None:
    gt, preds = _glc_case()
    res = glc_correct(gt, preds, first_box_id=100, iteration=2)
    prov = res.provenance.to_pydict()
    assert prov["image_id"] == ["a", "a", "a", "a", "c"]
    assert prov["rule"] == ["noisy", "kept", "kept", "md", "md"]
    assert prov["gt_box_id"] == [1, 2, 4, None, None]
    assert prov["det_id"] == [0, None, None, 3, 0]
    assert prov["box_id"] == [100, 101, 102, 103, 104]
    assert res.removed.to_pydict() == {"image_id": ["a", "b"], "box_id": [3, 5]}
    labels = res.labels
    assert labels["box_id"].to_pylist() == prov["box_id"]
    assert labels["class_id"].to_pylist() == [0, 1, 0, 1, 2]  # noisy keeps the GT class
    assert labels["x1"].to_pylist()[0] == 1 and labels["x2"].to_pylist()[0] == 11
    assert labels["area"].to_pylist() == [100, 100, 100, 100, 64]
    assert set(labels["source"].to_pylist()) == {"gt"} and set(labels["iteration"].to_pylist()) == {
        2
    }
    assert res.counts() == {"kept": 2, "md": 2, "noisy": 1, "mistakes": 2}
    assert gt["box_id"].to_pylist() == [1, 2, 3, 4, 5]  # the input is untouched


def test_glc_rules_are_switchable_and_need_cons_iou() -> None:
    gt, preds = _glc_case()
    off = glc_correct(gt, preds, GlcParams(md=False, mistakes=False, noisy=False))
    assert off.provenance["rule"].to_pylist() == ["kept"] * 4 + ["kept"]
    assert off.labels["box_id"].to_pylist() == [6, 7, 8, 9, 10]  # after gt's largest id
    no_md = glc_correct(gt, preds, GlcParams(md=False))
    assert no_md.counts() == {"kept": 2, "md": 0, "noisy": 1, "mistakes": 2}
    strict = glc_correct(gt, preds, GlcParams(correct_max_inter=0.8))  # G1 IoU 0.818 > 0.8
    assert strict.counts()["noisy"] == 0
    with pytest.raises(ValueError, match="cons_iou"):
        glc_correct(gt, preds.drop_columns(["cons_iou"]))
    only_mistakes = glc_correct(
        gt, preds.drop_columns(["cons_iou"]), GlcParams(md=False, noisy=False)
    )
    assert only_mistakes.counts()["mistakes"] == 2
    labels = labels_from_boxes(gt, source="human", iteration=0)
    assert set(glc_correct(labels, preds).labels["source"].to_pylist()) == {"human", "gt"}


def _grid_gt() -> tuple[pa.Table, pa.Table]:
    """3 images of 400×400, 16 boxes of 30×30 each on a 100 px grid (far from each other)."""
    ids, coords = [], []
    for image in ("p", "q", "r"):
        for gx in range(4):
            for gy in range(4):
                x, y = 35 + 100 * gx, 35 + 100 * gy
                ids.append(image)
                coords.append([x, y, x + 30, y + 30])
    gt = box_rows(ids, coords, np.arange(len(ids)) % 3)
    images = pa.table({"image_id": ["p", "q", "r"], "width": [400] * 3, "height": [400] * 3})
    return gt, images


def test_stress_corruption_is_seeded_and_recorded() -> None:
    gt, images = _grid_gt()
    bad, changes = corrupt_labels(gt, images, seed=0)
    kinds = Counter(changes["kind"].to_pylist())
    assert kinds["dropped"] == round(0.2 * 48) == 10
    assert kinds["shifted"] + kinds["resized"] == round(0.2 * 38) == 8
    assert kinds["added"] == 3  # k = 1 per image
    assert bad.num_rows == 48 - 10 + 3
    again_bad, again = corrupt_labels(gt, images, seed=0)
    assert again.equals(changes) and again_bad.equals(bad)
    assert not corrupt_labels(gt, images, seed=1)[1].equals(changes)
    ch = changes.to_pandas()
    for _, row in ch[ch["kind"].isin(["shifted", "resized"])].iterrows():
        orig = np.array([row[f"orig_{c}"] for c in schema.COORDS])
        new = np.array([row[c] for c in schema.COORDS])
        if row["kind"] == "shifted":
            dx, dy = new[:2] - orig[:2]
            assert np.allclose(new[2:] - orig[2:], [dx, dy])
            assert 3 - 1e-9 <= abs(dx) <= 6 + 1e-9 and 3 - 1e-9 <= abs(dy) <= 6 + 1e-9
        else:
            scale = (new[2:] - new[:2]) / 30
            assert np.all((np.abs(scale - 1) >= 0.1 - 1e-9) & (np.abs(scale - 1) <= 0.2 + 1e-9))
    added = ch[ch["kind"] == "added"]
    w, h = added["x2"] - added["x1"], added["y2"] - added["y1"]
    assert ((w >= 10) & (w <= 100) & (h >= 10) & (h <= 100)).all()
    assert ((added["x1"] >= 0) & (added["x2"] <= 400) & (added["y2"] <= 400)).all()
    assert set(added["box_id"]) == {48, 49, 50}
    kept = bad.filter(pa.array(~np.isin(bad["box_id"].to_numpy(), added["box_id"])))
    for _, a in added.iterrows():  # added boxes overlap no other box of the image
        same = kept.filter(pa.array(np.array(kept["image_id"].to_pylist()) == a["image_id"]))
        xy = np.stack([same[c].to_numpy() for c in schema.COORDS], axis=1)
        inter_w = np.minimum(xy[:, 2], a["x2"]) - np.maximum(xy[:, 0], a["x1"])
        inter_h = np.minimum(xy[:, 3], a["y2"]) - np.maximum(xy[:, 1], a["y1"])
        assert not np.any((inter_w > 0) & (inter_h > 0))


def test_stress_recovery_with_a_perfect_consistent_teacher() -> None:
    gt, images = _grid_gt()
    bad, changes = corrupt_labels(gt, images, seed=10)  # a seed whose added boxes miss all GT
    added = changes.filter(pa.array(np.array(changes["kind"].to_pylist()) == "added"))
    orig = np.stack([gt[c].to_numpy() for c in schema.COORDS], axis=1)
    image = np.array(gt["image_id"].to_pylist())
    for row in added.to_pylist():  # so md can find every dropped box
        box = np.array([row[c] for c in schema.COORDS])
        same = orig[image == row["image_id"]]
        lt, rb = np.maximum(same[:, :2], box[:2]), np.minimum(same[:, 2:], box[2:])
        assert not np.any(np.all(rb > lt, axis=1))
    teacher = predictions_from_rows(
        [
            {"image_id": r["image_id"], "class_id": r["class_id"], "score": 0.9}
            | {c: r[c] for c in schema.COORDS}
            for r in gt.to_pylist()
        ]
    ).append_column("cons_iou", pa.array(np.full(gt.num_rows, 0.95), pa.float32()))
    result = glc_correct(bad, teacher)
    rec = glc_recovery(result, changes)
    for key in ("md", "mistakes", "noisy"):
        assert rec[f"{key}_precision"] == 1 and rec[f"{key}_recall"] == 1, key
    assert rec["noisy_iou_after"] == 1 and rec["noisy_iou_before"] < 0.9
    assert (rec["n_dropped"], rec["n_moved"], rec["n_added"]) == (10, 8, 3)
    nothing = glc_recovery(glc_correct(bad, teacher, GlcParams(False, False, False)), changes)
    assert nothing["md_recall"] == 0 and math.isnan(nothing["md_precision"])
    assert nothing["noisy_iou_after"] == pytest.approx(nothing["noisy_iou_before"])
    assert (
        corrupt_labels(gt, images, 0, StressParams(drop=0, jitter=0, add_per_image=0))[0].num_rows
        == 48
    )


# ---- CSD (§11.9) ------------------------------------------------------------------------------


def test_csd_split_pin_i() -> None:
    split = csd_split(5985, 8, 3)
    assert (split.num_labeled, split.labeled_per_batch, split.unlabeled_per_batch) == (1496, 2, 6)
    assert csd_split(100, 8, 0).num_labeled == 96
    with pytest.raises(ValueError):
        csd_split(10, 0, 3)


def test_csd_ramp_pin_i() -> None:
    n = 120_000
    assert csd_ramp(0, n) == 0
    assert csd_ramp(32_000, n) == 1 and csd_ramp(100_000, n) == 1 and csd_ramp(60_000, n) == 1
    assert csd_ramp(n, n) == pytest.approx(math.exp(-12.5))
    assert csd_ramp(16_000, n) == pytest.approx(math.exp(-5 * 0.25))
    assert csd_ramp(110_000, n) == pytest.approx(math.exp(-12.5 * 0.25))
    assert csd_ramp(1, n) == pytest.approx(math.exp(-5 * (1 - 1 / 32_000) ** 2))
    n = 1000  # t_up = 266.67, t_down = 833.33: breakpoints need not be integers
    assert csd_ramp(266, n) < 1 and csd_ramp(267, n) == 1 and csd_ramp(834, n) < 1
    with pytest.raises(ValueError):
        csd_ramp(n + 1, n)
