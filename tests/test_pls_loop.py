"""PLS (ALGORITHMS §11.7) in the SSL loop: the function the pseudo_label phase calls
(``pseudo_refine.pls_filter`` / ``refiner``) on a hand-built predictions table against a brute
force of S, C, D and decision 8's ceil(top_k·N); a whole in-process SSL run with ``ssl.pls: top``
on digits-det tiny that shares the teacher of a plain run; and ``detloop pls`` end to end on
such a run (outputs, the printed table, the refusal of an existing tag)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from detloop.config import ExperimentConfig, build_config, config_snapshot
from detloop.data import schema
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.runs import create_run, stored_config, strategy_name
from detloop.orchestrator.loops.pseudo_refine import pls_filter, refiner
from detloop.orchestrator.loops.semi_supervised import SemiSupervisedLoop
from detloop.selectors.pseudo import select_pseudo_labels
from test_loop_inprocess import ci_config, small_val
from test_ssl_loop_inprocess import SslWorkers, _interrupt

# ---- the phase's function on a hand-built table --------------------------------------------------


def _predictions(dets: dict[str, list[tuple[int, float]]]) -> pa.Table:
    """A predictions table (the columns pseudo-labeling reads): per image (class, score) rows,
    boxes side by side."""
    rows = [(i, k, c, s) for i, ds in dets.items() for k, (c, s) in enumerate(ds)]
    n = len(rows)
    x = np.array([20.0 * r[1] for r in rows], dtype=np.float32)
    return pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.string()),
            "det_id": pa.array([r[1] for r in rows], pa.int32()),
            "class_id": pa.array([r[2] for r in rows], pa.int32()),
            "score": pa.array([r[3] for r in rows], pa.float32()),
            "x1": pa.array(x),
            "y1": pa.array(np.zeros(n, np.float32)),
            "x2": pa.array(x + 10),
            "y2": pa.array(np.full(n, 10, np.float32)),
        }
    )


def _hand_case(n_images: int = 10, seed: int = 3) -> dict[str, list[tuple[int, float]]]:
    """Images with 3-8 detections of classes 0-2 (scores 0.3-1.0 and a few under 0.1, which
    drate_0 must not count), each with at least one score > 0.4."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_images):
        n = int(rng.integers(3, 9))
        scores = np.round(rng.uniform(0.05, 1.0, n), 2)
        scores[0] = 0.9
        out[f"pool/im{i:02d}"] = [(int(rng.integers(0, 3)), float(s)) for s in scores]
    return out


def _brute_force_d(
    dets: dict[str, list[tuple[int, float]]],
    tau: float = 0.4,
    beta: float = 0.1,
    delta: float | None = None,
) -> dict[str, float]:
    """S, C, D of §11.7 written out: pseudo-labels score > τ, S = share of the scores ≥ 0.1
    that are ≥ δ_S (default τ)."""
    f32 = np.float32
    delta = tau if delta is None else delta
    pseudo = {i: [c for c, s in ds if f32(s) > f32(tau)] for i, ds in dets.items()}
    all_classes = [c for cs in pseudo.values() for c in cs]
    share = {c: all_classes.count(c) / len(all_classes) for c in set(all_classes)}
    out = {}
    for i, ds in dets.items():
        if not pseudo[i]:
            continue
        scores = [f32(s) for _, s in ds if f32(s) >= f32(0.1)]
        s_i = sum(s >= f32(delta) for s in scores) / len(scores)
        c_i = float(np.mean([1 - share[c] for c in pseudo[i]]))
        out[i] = (1 - beta) * s_i + beta * c_i
    return out


def test_pls_top_keeps_ceil_top_k_images_with_the_highest_d() -> None:
    """§11 pin (g) through the loop's function: 0.4 of 10 images keeps the 4 highest D, with
    every pseudo-label of those images and none of the others."""
    dets = _hand_case()
    preds = _predictions(dets)
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    expected = _brute_force_d(dets)
    assert len(expected) == 10
    out = pls_filter(kept, preds, "top", top_k=0.4, tau=0.4, beta=0.1, iteration=1)
    top = sorted(expected, key=lambda i: (-expected[i], i))[:4]
    assert sorted(set(out.kept["image_id"].to_pylist())) == sorted(top)
    assert out.kept.num_rows == sum(1 for i in kept["image_id"].to_pylist() if i in top)
    scores = out.scores
    np.testing.assert_allclose(scores["D"].to_numpy(), [expected[i] for i in sorted(expected)])
    assert scores["kept"].to_pylist() == [i in top for i in sorted(expected)]
    rank = dict(zip(scores["image_id"].to_pylist(), scores["rank"].to_pylist(), strict=True))
    assert sorted(i for i, r in rank.items() if r < 4) == sorted(top)
    n_det = [sum(s >= 0.1 for _, s in dets[i]) for i in sorted(expected)]
    assert scores["n_det"].to_pylist() == n_det
    assert set(scores["iteration"].to_pylist()) == {1}
    d_kept = np.mean([expected[i] for i in top])
    d_dropped = np.mean([v for i, v in expected.items() if i not in top])
    assert out.info["pls_images_before"] == 10 and out.info["pls_images_after"] == 4
    assert out.info["pls_labels_before"] == kept.num_rows
    assert out.info["pls_d_kept"] == pytest.approx(d_kept)
    assert out.info["pls_d_dropped"] == pytest.approx(d_dropped)
    assert d_kept > d_dropped


@pytest.mark.parametrize(("n", "top_k", "n_keep"), [(10, 0.4, 4), (7, 0.4, 3), (5, 0.3, 2)])
def test_pls_variants_sizes_and_seeded_rand(n: int, top_k: float, n_keep: int) -> None:
    dets = _hand_case(n, seed=n)
    preds = _predictions(dets)
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    assert math.ceil(top_k * n) == n_keep

    def images(variant: str, seed: int = 0) -> set[str]:
        rng = np.random.default_rng(seed)
        out = pls_filter(kept, preds, variant, top_k=top_k, rng=rng)  # type: ignore[arg-type]
        return set(out.kept["image_id"].to_pylist())

    top, bot = images("top"), images("bot")
    assert len(top) == n_keep and len(bot) == n - n_keep and not top & bot
    assert len(images("rand")) == n_keep and images("rand", 5) == images("rand", 5)


def test_pls_ties_are_broken_by_image_id() -> None:
    same = [(0, 0.9), (0, 0.2)]
    dets = {"pool/b": same, "pool/a": same, "pool/c": [(0, 0.9), (0, 0.2), (0, 0.2)]}
    preds = _predictions(dets)
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    out = pls_filter(kept, preds, "top", top_k=0.2)  # ceil(0.6) = 1 of a tie: "pool/a"
    assert out.kept["image_id"].to_pylist() == ["pool/a"]


def test_refiner_writes_the_round_table_and_uses_pls_tau(tmp_path: Path) -> None:
    dets = _hand_case()
    preds = _predictions(dets)
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    run = RunDir(tmp_path / "run")
    off = build_config({"loop": "ssl"})
    assert refiner(run, off, preds, 1, seed=0) is None  # nothing asked: the phase as before
    cfg = build_config({"loop": "ssl", "ssl": {"pls": "top", "pls_tau": 0.6, "pls_beta": 0.5}})
    refine = refiner(run, cfg, preds, 2, seed=0)
    assert refine is not None
    stored, info = refine(kept)
    table = read_table(schema.PLS_SCORES, run.pls_scores_file(2))
    expected = _brute_force_d(dets, tau=0.4, beta=0.5, delta=0.6)
    np.testing.assert_allclose(table["D"].to_numpy(), [expected[i] for i in sorted(expected)])
    assert set(stored["image_id"].to_pylist()) == set(
        table.filter(table["kept"])["image_id"].to_pylist()
    )
    assert info["pls_images_after"] == 4


def test_pls_config_is_checked() -> None:
    from detloop.config import ConfigError

    with pytest.raises(ConfigError, match="teacher: ema"):
        build_config({"loop": "ssl", "ssl": {"pls": "top", "teacher": "ema"}})
    with pytest.raises(ConfigError, match="loop: ssl"):
        build_config({"loop": "al", "al": {"ssl": True}, "ssl": {"pls": "rand"}})
    with pytest.raises(ConfigError, match="pls"):
        build_config({"loop": "ssl", "ssl": {"pls": "best"}})
    cfg = build_config({"loop": "ssl", "ssl": {"tau": 0.5}})
    assert cfg.ssl.pls == "none" and cfg.ssl.pls_top_k == 0.4 and cfg.ssl.pls_delta == 0.5
    named = build_config({"loop": "ssl", "ssl": {"pls": "top", "pls_top_k": 0.3}})
    assert strategy_name(named) == "score+pls_top_k0.3"
    both = build_config({"loop": "ssl", "ssl": {"pls": "rand", "oracle_variant": "nofd"}})
    assert strategy_name(both) == "score+pls_rand+3d_nofd"


# ---- the loop on digits-det tiny ---------------------------------------------------------------

SSL = ["loop=ssl", "ssl.portion_labeled=25", "ssl.selection_strategy=score"]


@pytest.fixture()
def cfg(digits_tiny: Path, tmp_path: Path) -> ExperimentConfig:
    val = small_val(digits_tiny, tmp_path / "val.json")
    base = ci_config(digits_tiny, val, tmp_path / "runs")
    return build_config(config_snapshot(base), SSL)


def run_loop(cfg: ExperimentConfig, *sets: str) -> tuple[RunDir, SslWorkers]:
    """One in-process SSL run of ``cfg`` with ``sets`` on fake workers; done."""
    run = create_run(build_config(config_snapshot(cfg), list(sets)))
    workers = SslWorkers(run)
    loop = SemiSupervisedLoop(run, stored_config(run), [], lambda _: workers, _interrupt)
    assert loop.execute() == "done"
    return run, workers


def pseudo_images(run: RunDir, iteration: int = 1) -> set[str]:
    labels = run.read_labels()
    mask = pc.and_(pc.equal(labels["source"], "pseudo"), pc.equal(labels["iteration"], iteration))
    return set(labels.filter(mask)["image_id"].to_pylist())


def test_ssl_run_with_pls_top(cfg: ExperimentConfig) -> None:
    """``ssl.pls: top``: the student's pseudo part is the ceil(0.4·N) images of highest D among
    the N the τ selection pseudo-labeled (those of the plain run: the teacher is shared)."""
    plain, _ = run_loop(cfg)
    run, workers = run_loop(cfg, "ssl.pls=top")
    assert run.name == "ssl-score+pls_top-s0"
    cached = [
        h for h in run.read_meta()["history"] if h["iteration"] == 0 and h["phase"] == "train"
    ]
    assert cached[-1].get("warmup_cache") is True  # the plain run's teacher, copied
    table = read_table(schema.PLS_SCORES, run.pls_scores_file(1))
    n = table.num_rows
    assert set(table["image_id"].to_pylist()) == pseudo_images(plain) and n > 4
    kept = set(table.filter(table["kept"])["image_id"].to_pylist())
    assert len(kept) == math.ceil(0.4 * n)
    d = dict(zip(table["image_id"].to_pylist(), table["D"].to_pylist(), strict=True))
    assert min(d[i] for i in kept) >= max(v for i, v in d.items() if i not in kept)
    assert pseudo_images(run) == kept
    student = workers.jobs[-1]
    assert student.pseudo is not None
    assert set(student.pseudo[0]["image_id"].to_pylist()) == kept
    m1 = read_json(run.metrics_file(1))
    assert m1["pseudo_label_pls_images_before"] == n
    assert m1["pseudo_label_pls_images_after"] == m1["pseudo_label_pseudo_images"] == len(kept)
    assert m1["pseudo_label_pls_d_kept"] >= m1["pseudo_label_pls_d_dropped"]
    assert not plain.pls_scores_file(1).exists()


def _config_file(cfg: ExperimentConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config_snapshot(cfg)))
    return path


def test_detloop_pls_end_to_end(
    cfg: ExperimentConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``detloop pls`` on a finished PLS run: every τ-selected image of round 1 (not only the
    kept ones: ``trained`` marks those), its drate, GT and misses; AUCs, report, ROC plot; an
    existing tag, round 0 and an AL run are refused with exit 2 and a message."""
    from detloop.cli.main import main

    run, _ = run_loop(cfg, "ssl.pls=top")
    config = _config_file(cfg, tmp_path / "ssl.yaml")
    assert main(["pls", str(config), "--run", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "AUC, missing rate >" in out and "written: pls/round_1/" in out
    folder = run.pls_dir("round_1")
    table = read_table(schema.PLS_ANALYSIS, folder / "images.parquet")
    loop_table = read_table(schema.PLS_SCORES, run.pls_scores_file(1))
    assert table["image_id"].to_pylist() == loop_table["image_id"].to_pylist()
    np.testing.assert_allclose(table["D"].to_numpy(), loop_table["D"].to_numpy())
    assert table["trained"].to_pylist() == loop_table["kept"].to_pylist()
    drates = np.stack([table[c].to_numpy() for c in schema.DRATE_COLS], axis=1)
    assert (np.diff(drates, axis=1) <= 0).all()  # counts above rising thresholds
    gt = run.read_gt().filter(pc.is_in(run.read_gt()["image_id"], value_set=table["image_id"]))
    assert pc.sum(table["n_gt"]).as_py() == gt.num_rows
    assert (table["n_missed"].to_numpy() <= table["n_gt"].to_numpy()).all()
    report = json.loads((folder / "report.json").read_text())
    assert report["images"] == table.num_rows and report["run_pls"] == "top"
    assert set(report["auc"]) >= {"S", "C", "D", "drop_max", "n_det", "mean_score"}
    assert set(report["auc"]["D"]) == {"0", "0.25", "0.5", "0.75"}
    assert (folder / "roc.png").stat().st_size > 0
    # never over an existing analysis; a new tag, another round's δ_S via --set
    assert main(["pls", str(config), "--run", str(run.path)]) == 2
    assert "already exists; pass another --tag" in capsys.readouterr().err
    args = ["--tag", "tau06", "--set", "ssl.pls_tau=0.6"]
    assert main(["pls", str(config), "--run", str(run.path), *args]) == 0
    assert read_json(run.pls_dir("tau06") / "report.json")["tau_s"] == 0.6
    capsys.readouterr()
    assert main(["pls", str(config), "--run", str(run.path), "--round", "2", "--tag", "x"]) == 2
    assert "round 2 has no teacher predictions" in capsys.readouterr().err
    assert not run.pls_dir("x").exists()
    assert sorted(p.name for p in run.pls_root.iterdir()) == ["round_1", "tau06"]
    al = create_run(build_config(config_snapshot(cfg), ["loop=al"]))  # run.json only
    assert main(["pls", str(config), "--run", str(al.path)]) == 2
    assert "of an SSL run (loop: ssl); this run is loop: al" in capsys.readouterr().err
