"""Pseudo-labels against the hidden gt: precision and recall in all and per class, the
per-class table the SSL loop logs, and its numbers and plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from detloop.data import schema
from detloop.reports.pseudo_classes import class_numbers, pseudo_class_plot
from detloop.selectors.pseudo_quality import (
    PseudoQuality,
    pseudo_class_rows,
    pseudo_quality,
    pseudo_quality_by_class,
)


def _boxes(rows: list[tuple[str, int, float, float, float, float, float]]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 7
    return pa.table(
        {
            "image_id": pa.array(cols[0], pa.string()),
            "class_id": pa.array(cols[1], pa.int32()),
            **{c: pa.array(v, pa.float64()) for c, v in zip(schema.COORDS, cols[2:6], strict=True)},
            "score": pa.array(cols[6], pa.float64()),
        }
    )


def test_pseudo_quality_by_hand() -> None:
    gt = _boxes(
        [
            ("a", 0, 0, 0, 10, 10, 1.0),
            ("a", 1, 20, 20, 30, 30, 1.0),
            ("b", 0, 0, 0, 10, 10, 1.0),
            ("z", 0, 0, 0, 10, 10, 1.0),  # not a candidate: ignored
        ]
    )
    pseudo = _boxes(
        [
            ("a", 0, 0, 0, 10, 12, 0.9),  # IoU 10/12 ≥ 0.5, right class: hit
            ("a", 0, 0, 0, 10, 11, 0.5),  # same gt already taken by the higher score: miss
            ("a", 0, 20, 20, 30, 30, 0.8),  # right place, wrong class: miss
            ("b", 0, 0, 0, 10, 30, 0.7),  # IoU 1/3: miss
            ("c", 0, 0, 0, 5, 5, 0.6),  # image without gt: miss
        ]
    )
    q = pseudo_quality(pseudo, gt, ["a", "b", "c"])
    assert (q.n_pseudo, q.n_gt, q.matched) == (5, 3, 1)
    assert q.precision == pytest.approx(1 / 5) and q.recall == pytest.approx(1 / 3)
    empty = pseudo_quality(pseudo.slice(0, 0), gt, ["a"])
    assert empty.recall == 0 and np.isnan(empty.precision)


def _hand_case() -> tuple[pa.Table, pa.Table]:
    gt = _boxes(
        [
            ("a", 0, 0, 0, 10, 10, 1.0),
            ("a", 1, 20, 20, 30, 30, 1.0),
            ("b", 1, 0, 0, 10, 10, 1.0),
            ("b", 2, 40, 40, 50, 50, 1.0),
        ]
    )
    pseudo = _boxes(
        [
            ("a", 0, 0, 0, 10, 10, 0.9),  # hit
            ("a", 1, 20, 20, 30, 31, 0.8),  # hit
            ("a", 1, 0, 0, 10, 10, 0.7),  # class 1 where gt is class 0: miss
            ("b", 1, 0, 0, 10, 10, 0.6),  # hit
            ("b", 0, 40, 40, 50, 50, 0.5),  # class 0 where gt is class 2: miss
        ]
    )
    return gt, pseudo


def test_pseudo_quality_per_class_by_hand_adds_up_to_the_whole() -> None:
    gt, pseudo = _hand_case()
    by_class = pseudo_quality_by_class(pseudo, gt, ["a", "b"])
    assert by_class == {
        0: PseudoQuality(n_pseudo=2, n_gt=1, matched=1),
        1: PseudoQuality(n_pseudo=3, n_gt=2, matched=2),
        2: PseudoQuality(n_pseudo=0, n_gt=1, matched=0),
    }
    total = sum(by_class.values(), PseudoQuality(0, 0, 0))
    assert total == pseudo_quality(pseudo, gt, ["a", "b"]) == PseudoQuality(5, 4, 3)
    # only the candidate images count
    assert pseudo_quality_by_class(pseudo, gt, ["b"]) == {
        0: PseudoQuality(1, 0, 0),
        1: PseudoQuality(1, 1, 1),
        2: PseudoQuality(0, 1, 0),
    }


def test_pseudo_class_rows_by_hand() -> None:
    gt, pseudo = _hand_case()
    labeled = _boxes([("l", c, 0, 0, 5, 5, 1.0) for c in (0, 0, 0, 2)])
    names = {0: "zero", 1: "one", 2: "two", 3: "three"}
    counts = pseudo_class_rows(pseudo, labeled, names)
    assert counts == [
        {"class_id": 0, "name": "zero", "labeled": 3, "pseudo": 2},
        {"class_id": 1, "name": "one", "labeled": 0, "pseudo": 3},
        {"class_id": 2, "name": "two", "labeled": 1, "pseudo": 0},
        {"class_id": 3, "name": "three", "labeled": 0, "pseudo": 0},
    ]
    quality = pseudo_quality_by_class(pseudo, gt, ["a", "b"])
    rows = pseudo_class_rows(pseudo, labeled, names, quality)
    scored = [(r["gt"], r["matched"], r["precision"], r["recall"]) for r in rows]
    assert scored == [(1, 1, 0.5, 1.0), (2, 2, 2 / 3, 1.0), (1, 0, None, 0.0), (0, 0, None, None)]
    assert class_numbers(rows) == {
        "pseudo_boxes/zero": 2.0,
        "pseudo_precision/zero": 0.5,
        "pseudo_recall/zero": 1.0,
        "pseudo_boxes/one": 3.0,
        "pseudo_precision/one": 2 / 3,
        "pseudo_recall/one": 1.0,
        "pseudo_boxes/two": 0.0,
        "pseudo_recall/two": 0.0,
        "pseudo_boxes/three": 0.0,
    }
    assert class_numbers(counts) == {f"pseudo_boxes/{r['name']}": r["pseudo"] for r in counts}


@pytest.mark.parametrize("with_gt", [True, False])
def test_pseudo_class_plot_is_written(tmp_path: Path, with_gt: bool) -> None:
    gt, pseudo = _hand_case()
    labeled = _boxes([("l", 0, 0, 0, 5, 5, 1.0)])
    names = {0: "zero", 1: "one", 2: "two"}
    quality = pseudo_quality_by_class(pseudo, gt, ["a", "b"]) if with_gt else None
    rows = pseudo_class_rows(pseudo, labeled, names, quality)
    path = pseudo_class_plot(rows, tmp_path / "classes.png", "round 1")
    assert path.read_bytes().startswith(b"\x89PNG")
    empty = pseudo_class_rows(pseudo.slice(0, 0), labeled.slice(0, 0), names)
    assert pseudo_class_plot(empty, tmp_path / "empty.png", "none").exists()
