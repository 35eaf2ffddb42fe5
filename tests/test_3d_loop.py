"""The 3D pseudo-label error study (ALGORITHMS §11.8) in the SSL loop: every variant through the
loop's function (``pseudo_refine.oracle_filter``) on a hand example, the phase's step against
a run's ground truth, an in-process SSL run with ``ssl.oracle_variant: nofd`` on digits-det tiny
sharing the teacher of a plain run, and the study as one grid (``detloop grid --vary``): one
loop and one MLflow run per variant, without Ray (its coordinator tasks run in this process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from detloop.config import ConfigError, ExperimentConfig, build_config, config_snapshot
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_json
from detloop.data.labels import box_rows
from detloop.data.rundir import RunDir, RunsRoot
from detloop.orchestrator.engine.runs import run_dir_for
from detloop.orchestrator.loops.pseudo_refine import oracle_filter, refiner
from detloop.selectors.pseudo import pseudo_labels_table, select_pseudo_labels
from detloop.selectors.ssl_3d import VARIANTS
from test_pls_loop import SSL, pseudo_images, run_loop
from test_ssl_loop_inprocess import SslWorkers

# ---- every variant through the loop's function ------------------------------------------------


def _boxes(rows: list[tuple[str, int, list[float], float]]) -> pa.Table:
    """Box rows (image, class, xyxy, score) with the predictions' columns and types."""
    coords = np.array([r[2] for r in rows], dtype=np.float32).reshape(-1, 4)
    return pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.string()),
            "det_id": pa.array(range(len(rows)), pa.int32()),
            "class_id": pa.array([r[1] for r in rows], pa.int32()),
            "score": pa.array([r[3] for r in rows], pa.float32()),
            **{c: pa.array(coords[:, k]) for k, c in enumerate(schema.COORDS)},
        }
    )


def _case() -> tuple[pa.Table, pa.Table]:
    """(teacher predictions, gt) of four pool images; τ = 0.4 keeps every row but e's."""
    preds = _boxes(
        [
            ("pool/a", 0, [0, 0, 10, 10], 0.9),  # p0: g0 at IoU 1
            ("pool/a", 0, [0, 0, 10, 9], 0.8),  # p1: g0 already taken, a false detection
            ("pool/a", 0, [20, 20, 30, 28], 0.7),  # p2: g1 at IoU 0.8
            ("pool/a", 0, [50, 50, 60, 60], 0.6),  # p3: on g2, the wrong class
            ("pool/b", 0, [0, 0, 10, 6], 0.5),  # q0: h0 at IoU 0.6
            ("pool/b", 0, [0, 0, 10, 10], 0.45),  # q1: h0 taken by the higher score
            ("pool/c", 0, [0, 0, 5, 5], 0.95),  # r0: an image without GT
            ("pool/e", 0, [0, 0, 10, 10], 0.2),  # under τ: e holds no pseudo-label
        ]
    )
    gt = _boxes(
        [
            ("pool/a", 0, [0, 0, 10, 10], 1),  # g0
            ("pool/a", 0, [20, 20, 30, 30], 1),  # g1
            ("pool/a", 1, [50, 50, 60, 60], 1),  # g2: missed
            ("pool/b", 0, [0, 0, 10, 10], 1),  # h0
            ("pool/e", 2, [0, 0, 10, 10], 1),  # e0: its image has no pseudo-label
        ]
    ).drop_columns(["det_id", "score"])
    return preds, gt


#: det_id of each kept row (None: a GT added by fixmd), gt added, boxes replaced
EXPECTED: dict[str, tuple[list[int | None], int, int]] = {
    "nofd": ([0, 2, 4], 0, 0),
    "nomd": ([4, 5, 6], 0, 0),  # image a has the missed g2
    "nomdfd": ([4], 0, 0),
    "fixmd": ([0, 1, 2, 3, None, 4, 5, 6], 1, 0),  # g2 added on a, never e0 on e
    "highprec": ([0], 0, 0),  # IoU >= 0.9
    "nonoise": ([0, 1, 2, 3, 4, 5, 6], 0, 2),  # p0, p2 matched at IoU >= 0.75
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_through_the_loop_function(variant: Any) -> None:
    """§11 pin (h) on the loop's path: τ-selected pseudo-labels in, the variant's set out, as
    ``labels`` rows the pool accepts."""
    preds, gt = _case()
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    assert kept.num_rows == 7
    out, info = oracle_filter(kept, gt, variant)
    dets, added, replaced = EXPECTED[variant]
    assert out["det_id"].to_pylist() == dets
    assert info["oracle_labels_before"] == 7 and info["oracle_labels_after"] == len(dets)
    assert info["oracle_false_detections"] == 4 and info["oracle_missed_gt"] == 1
    assert info["oracle_gt_added"] == added and info["oracle_boxes_replaced"] == replaced
    assert info["oracle_images_after"] == len(set(out["image_id"].to_pylist()))
    assert "origin" not in out.column_names
    rows = pseudo_labels_table(out, iteration=1)
    schema.validate_table(rows, schema.LABELS)
    assert rows["weight"].to_pylist() == [1.0] * len(dets)
    if variant == "nonoise":
        assert out["y2"].to_pylist()[2] == 30  # p2's box is g1's now
        assert out["y2"].to_pylist()[4] == 6  # q0 (IoU 0.6) unchanged
    if variant == "fixmd":
        assert rows.filter(pc.is_null(out["det_id"]))["class_id"].to_pylist() == [1]


def _run_with_gt(tmp_path: Path, gt: pa.Table) -> RunDir:
    """A run directory whose pool holds the case's images and ``gt``."""
    run = RunDir(tmp_path / "run")
    ids = ["pool/a", "pool/b", "pool/c", "pool/e", "val/v"]
    n = len(ids)
    images = pa.table(
        {
            "image_id": ids,
            "file": [f"{i}.png" for i in ids],
            "width": pa.array([100] * n, pa.int32()),
            "height": pa.array([100] * n, pa.int32()),
            "split": ["pool"] * 4 + ["val"],
            "state": ["unlabeled"] * n,
            "iteration": pa.nulls(n, pa.int32()),
            "phash": pa.nulls(n, pa.uint64()),
            "source_id": pa.nulls(n, pa.string()),
            "reason": pa.nulls(n, pa.string()),
        }
    )
    run.write_images(images)
    coords = np.stack([gt[c].to_numpy() for c in schema.COORDS], axis=1)
    run.write_gt(box_rows(gt["image_id"].to_pylist(), coords, gt["class_id"].to_numpy()))
    return run


def test_the_phase_step_corrects_with_the_pool_gt(tmp_path: Path) -> None:
    preds, gt = _case()
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    cfg = build_config({"loop": "ssl", "ssl": {"oracle_variant": "nomdfd"}})
    refine = refiner(_run_with_gt(tmp_path, gt), cfg, preds, 1, seed=0)
    assert refine is not None
    out, info = refine(kept)
    assert out["det_id"].to_pylist() == [4] and info["oracle_missed_gt"] == 1
    no_gt = _run_with_gt(tmp_path / "human", gt.slice(0, 0))
    refine = refiner(no_gt, cfg, preds, 1, seed=0)
    assert refine is not None
    with pytest.raises(DataError, match="needs the ground truth of the pool"):
        refine(kept)


def test_pls_then_3d_in_one_step(tmp_path: Path) -> None:
    """Both on: PLS keeps its images first, the study corrects what is left."""
    preds, gt = _case()
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    cfg = build_config(
        {"loop": "ssl", "ssl": {"pls": "top", "pls_top_k": 0.34, "oracle_variant": "nofd"}}
    )
    refine = refiner(_run_with_gt(tmp_path, gt), cfg, preds, 1, seed=0)
    assert refine is not None
    out, info = refine(kept)  # S = 1, C = 0 everywhere: ceil(0.34·3) = 2 of a tie, a and b
    assert info["pls_images_after"] == 2 and info["oracle_labels_before"] == 6
    assert out["det_id"].to_pylist() == [0, 2, 4]  # nofd of a and b


def test_3d_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"ssl.oracle_variant: nofd .*teacher: ema"):
        build_config({"loop": "ssl", "ssl": {"oracle_variant": "nofd", "teacher": "ema"}})
    with pytest.raises(ConfigError, match="oracle_variant"):
        build_config({"loop": "ssl", "ssl": {"oracle_variant": "nomissing"}})
    with pytest.raises(ConfigError, match="loop: ssl"):
        build_config({"ssl": {"oracle_variant": "fixmd"}})


# ---- the loop on digits-det tiny -----------------------------------------------------------------


@pytest.fixture()
def cfg(digits_tiny: Path, tmp_path: Path) -> ExperimentConfig:
    from test_loop_inprocess import ci_config, small_val

    val = small_val(digits_tiny, tmp_path / "val.json")
    return build_config(config_snapshot(ci_config(digits_tiny, val, tmp_path / "runs")), SSL)


def test_ssl_run_with_oracle_variant_nofd(cfg: ExperimentConfig) -> None:
    """``nofd``: the student's pseudo-labels are the plain run's less its false detections, all
    of them right (precision 1 against the hidden GT); the teacher is the plain run's."""
    plain, _ = run_loop(cfg)
    run, workers = run_loop(cfg, "ssl.oracle_variant=nofd")
    assert run.name == "ssl-score+3d_nofd-s0"
    history = run.read_meta()["history"]
    assert any(h["iteration"] == 0 and h.get("warmup_cache") for h in history)
    m0, m1 = read_json(plain.metrics_file(1)), read_json(run.metrics_file(1))
    before = m1["pseudo_label_oracle_labels_before"]
    assert before == m0["pseudo_label_pseudo_labels"] and m1["pseudo_label_oracle_false_detections"]
    assert m1["pseudo_label_pseudo_labels"] == before - m1["pseudo_label_oracle_false_detections"]
    assert m1["pseudo_label_pseudo_precision"] == 1.0 > m0["pseudo_label_pseudo_precision"]
    assert pseudo_images(run) <= pseudo_images(plain)
    student = workers.jobs[-1]
    assert student.pseudo is not None
    assert student.pseudo[1].num_rows == m1["pseudo_label_pseudo_labels"]


# ---- the study as one grid ---------------------------------------------------------------------


def test_grid_configs_cross_varied_keys(tmp_path: Path) -> None:
    from detloop.orchestrator.loops.grid import grid_configs

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "loop": "ssl", "runs_root": str(tmp_path)}))
    vary = [("ssl.oracle_variant", ["none", "nofd"]), ("ssl.pls", ["none", "top"])]
    cfgs = grid_configs(path, [], ["score"], [0, 1], vary)
    names = [run_dir_for(c).name for c in cfgs]
    assert len(names) == len(set(names)) == 8
    assert names[:4] == [
        "ssl-score-s0", "ssl-score+pls_top-s0", "ssl-score+3d_nofd-s0",
        "ssl-score+pls_top+3d_nofd-s0",
    ]  # fmt: skip
    assert [len(grid_configs(path, [], ["score"], [0]))] == [1]  # no --vary: as before
    with pytest.raises(ConfigError, match="would share this run directory"):
        grid_configs(path, [], ["score"], [0], [("train.epochs", ["1", "2"])])
    with pytest.raises(ConfigError, match="seed"):
        grid_configs(path, [], ["score"], [0], [("seed", ["1", "2"])])
    with pytest.raises(ConfigError, match="oracle_variant"):
        grid_configs(path, [], ["score"], [0], [("ssl.oracle_variant", ["nofd", "bogus"])])


def test_vary_option_parsing() -> None:
    from detloop.cli.common import UsageError
    from detloop.cli.loops import parse_vary

    assert parse_vary(["ssl.pls=top, bot", "al.al_budgets=[1,2],[3,4]"]) == [
        ("ssl.pls", ["top", "bot"]),
        ("al.al_budgets", ["[1,2]", "[3,4]"]),
    ]
    for bad in (["ssl.pls"], ["ssl.pls="], ["=a,b"], ["ssl.pls=a", "ssl.pls=b"]):
        with pytest.raises(UsageError):
            parse_vary(bad)


def test_3d_study_as_one_grid(
    cfg: ExperimentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``detloop grid --vary ssl.oracle_variant=nofd,fixmd``: two loops (the teacher trained
    once), two MLflow runs named after their variant, which is also a tag and a param. Ray's
    coordinator tasks run here, one after the other, on the in-process fake workers."""
    from mlflow.tracking import MlflowClient

    from detloop.cli.main import main
    from detloop.orchestrator.engine import journaled
    from detloop.orchestrator.loops import grid

    monkeypatch.setattr(grid, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(grid, "check_capacity", lambda *a, **k: None)
    monkeypatch.setattr(grid, "coordinator_tasks", lambda fn, args: [fn(a) for a in args])
    monkeypatch.setattr(journaled, "default_workers", lambda c: SslWorkers(run_dir_for(c)))
    tracked = build_config(config_snapshot(cfg), ["tracking.enabled=true"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config_snapshot(tracked)))
    args = ["grid", str(path), "--strategies", "score", "--vary", "ssl.oracle_variant=nofd,fixmd"]
    assert main(args) == 0
    root = RunsRoot(tracked.runs_root)
    runs = {r.name: r for r in root.runs_of("ci")}
    assert set(runs) == {"ssl-score+3d_nofd-s0", "ssl-score+3d_fixmd-s0"}
    trained = [
        h.get("warmup_cache", False)
        for r in runs.values()
        for h in r.read_meta()["history"]
        if h["iteration"] == 0 and h["phase"] == "train"
    ]
    assert trained.count(True) == 1  # one teacher for the study
    fixmd = read_json(runs["ssl-score+3d_fixmd-s0"].metrics_file(1))
    assert fixmd["pseudo_label_oracle_gt_added"] == fixmd["pseudo_label_oracle_missed_gt"] > 0
    client = MlflowClient(tracking_uri=root.tracking_uri)
    exp = client.get_experiment_by_name("ci")
    assert exp is not None
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == set(runs)
    for name, variant in (("ssl-score+3d_nofd-s0", "nofd"), ("ssl-score+3d_fixmd-s0", "fixmd")):
        data = found[name].data
        assert data.tags["oracle_variant"] == variant and data.tags["pls"] == "none"
        assert data.params["ssl.oracle_variant"] == variant
        assert found[name].info.status == "FINISHED"
