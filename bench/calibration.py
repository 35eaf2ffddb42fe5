"""Calibration and thresholding on digits-det with a tiny model trained for a few minutes (CPU).

Usage: python bench/calibration.py [--work DIR] [--steps N] [--chunk K] [--threads 2]
                                   [--pool-limit N] [--trials N] [--prepare-only]
                                   [--eval-images N]

Builds digits-det small (2000/300/300) in --work, trains the tiny preset (aleatoric head + MC
dropout; lr 0.003 and scale jitter 0.8-1.25 as bench/train_tiny.py) for --steps steps
(default 4000) in chunks of --chunk (each chunk a usable checkpoint
initialised from the previous one, with its own short warm-up and cosine schedule, so an
interrupted run resumes), predicts val and test, then:

* fits calibrators on val (100 %) and reports on the held-out test pairs: box-uncertainty ECE
  before/after ``iso_perclscoo`` (and every other box method), class ECE before/after
  ``iso_percls``;
* cost-sensitive thresholding on val (b = 0.95, FD@CD): FD@CD(0.95) and AUROC of the optimised
  ENTALBOX combination and of each single uncertainty, on val and, with the val weights and
  thresholds, on test.

``--eval-images N`` evaluates on N fresh val and N fresh test canvases instead of the 300 of
digits-det small: drawn with the same seed from the same held-out digits (never in the pool), so
only the sampling noise of the figures shrinks.

Writes bench/results/calibration.json. ``bench/autolabel.py`` reuses the same work directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig, build_config
from detloop.data import schema
from detloop.data.digits import digits_source, make_digits
from detloop.data.importer import import_source
from detloop.data.io import read_table, write_table
from detloop.data.rundir import RunDir
from detloop.learners import uq_metrics as uq
from detloop.learners.calibration import (
    BOX_CALIBRATORS,
    CalibrationSet,
    calibration_pairs,
    fit_calibration_set,
)
from detloop.orchestrator.evaluation.common import jsonable
from detloop.reports import uq_report

RESULTS = Path(__file__).parent / "results"
CLASS_KEYS = ("ece", "mce", "sce", "brier", "nll", "accuracy")
DEFAULT_WORK = Path(tempfile.gettempdir()) / "detloop_bench_uq"


def bench_config(threads: int, steps: int) -> ExperimentConfig:
    return build_config(
        {
            "model": {"preset": "tiny", "uncertainty": "mcdropout_lossatt"},
            "train": {
                "epochs": 1000,
                "max_steps": steps,
                "batch_size": 8,
                "device": "cpu",
                "torch_threads": threads,
                "amp": False,
                "warmup_epochs": 0.5,
                "lr": 0.003,
                "scale_jitter": [0.8, 1.25],
            },
            "predict": {"batch_size": 16},
        }
    )


def prepare(work: Path, steps: int, chunk: int, threads: int, pool_limit: int | None) -> Path:
    """Dataset, run with pool/val/test imported, and the trained checkpoint (cached)."""
    from detloop.learners.train import train_model

    data = work / "digits_small"
    if not (data / "test.json").exists():
        make_digits(data, "small", seed=0)
    run = RunDir(work / "run")
    if not run.images_file.exists():
        for split in ("pool", "val", "test"):
            source, images = digits_source(data, split)
            import_source(run, "coco", source, split, images=images, decode=False)
    images, gt = run.read_images(), run.read_gt()
    pool = images.filter(pc.equal(images["split"], "pool"))
    pool = pool.slice(0, pool_limit) if pool_limit else pool
    labels = gt.filter(pc.is_in(gt["image_id"], value_set=pool["image_id"].combine_chunks()))
    labels = labels.append_column("weight", pa.array(np.ones(labels.num_rows, np.float32)))
    prev: Path | None = None
    for k in range(int(np.ceil(steps / chunk))):
        ckpt = work / f"ckpt_{(k + 1) * chunk:05d}"
        if not (ckpt / "metadata.json").exists():
            t0 = time.perf_counter()
            res = train_model(bench_config(threads, chunk), pool, labels, 10, ckpt, seed=k,
                              init_weights=prev, progress=False)  # fmt: skip
            print(f"trained to step {(k + 1) * chunk}: loss {res.history[-1]['loss']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        prev = ckpt
    assert prev is not None
    return prev


def split_tables(run: RunDir, split: str) -> tuple[pa.Table, pa.Table]:
    images, gt = run.read_images(), run.read_gt()
    images = images.filter(pc.equal(images["split"], split))
    return images, gt.filter(
        pc.is_in(gt["image_id"], value_set=images["image_id"].combine_chunks())
    )


def eval_run(work: Path, n: int | None) -> RunDir:
    """The run holding the val and test splits: the training run's (300 each), or one with ``n``
    val and ``n`` test canvases of the same held-out digits (same seed)."""
    if not n:
        return RunDir(work / "run")
    run = RunDir(work / f"run_eval{n}")
    if not run.images_file.exists():
        data = work / f"digits_eval{n}"
        if not (data / "test.json").exists():
            make_digits(data, "small", seed=0, counts=(1, n, n))
        for split in ("val", "test"):
            source, images = digits_source(data, split)
            import_source(run, "coco", source, split, images=images, decode=False)
    return run


def predictions(
    work: Path, ckpt: Path, split: str, threads: int, run: RunDir | None = None
) -> tuple[pa.Table, pa.Table]:
    """Predictions and reference matches of a split (cached next to the checkpoint)."""
    import torch

    from detloop.learners.evaluate import match_reference
    from detloop.learners.predict import Predictor

    run = run or RunDir(work / "run")
    images, gt = split_tables(run, split)
    tag = "" if run.path.name == "run" else f"_{run.path.name}"
    path = work / f"{ckpt.name}{tag}_{split}_predictions.parquet"
    if not path.exists():
        torch.set_num_threads(threads)
        preds = Predictor.from_checkpoint(ckpt, bench_config(threads, 1)).predict(images, seed=0)
        write_table(preds, schema.PREDICTIONS, path)
    preds = read_table(schema.PREDICTIONS, path)
    return preds, match_reference(preds, gt)


def calibration_report(val_pairs: Any, test_pairs: Any) -> tuple[dict[str, Any], CalibrationSet]:
    """Held-out ECE before/after the default calibrators, and every box method's ECE."""
    cal = fit_calibration_set(val_pairs, "iso_percls", "iso_perclscoo")
    test_cal = uq_report.with_calibration(test_pairs, cal)
    labels = test_pairs["gt_class"].to_numpy(np.int64)
    probs = uq_report.class_probs(test_cal, cal)
    out: dict[str, Any] = {
        "n_val_pairs": len(val_pairs), "n_test_pairs": len(test_pairs),
        "class": {
            k: {m: v for m, v in uq.class_metrics(p, labels).items() if m in CLASS_KEYS}
            for k, p in probs.items()
        },
        "box": {},
    }  # fmt: skip
    for kind in uq_report.KINDS:
        before = uq_report.box_ece(test_cal, kind, False)
        after = uq_report.box_ece(test_cal, kind, True)
        methods = {}
        for name in BOX_CALIBRATORS:
            cs = fit_calibration_set(val_pairs, None, name)
            methods[name] = uq_report.box_ece(
                uq_report.with_calibration(test_pairs, cs), kind, True
            )
        out["box"][kind] = {"ece_before": before, "ece_after_iso_perclscoo": after,
                            "ratio": before / after if before and after else None,
                            "ece_after_by_method": methods}  # fmt: skip
    return out, cal


def threshold_report(val: Any, test: Any, trials: int) -> dict[str, Any]:
    """FD@CD(0.95) and AUROC of the ENTALBOX combination and of each single uncertainty."""
    from detloop.selectors.threshold import (
        CostSensitiveThresholder,
        threshold_rows,
        uncertainty_values,
    )
    from detloop.selectors.threshold_metrics import cd_labels, evaluate

    rows = {k: threshold_rows(p, m, "matched") for k, (p, m) in {"val": val, "test": test}.items()}
    th = CostSensitiveThresholder(
        "ENTALBOX", budget=0.95, calibrated=True, seed=0, n_trials=trials,
        patience=min(trials, 300),
    ).fit(rows["val"])  # fmt: skip
    res = th.result()
    out: dict[str, Any] = {"weights": res.weights, "threshold_mean": res.threshold_mean,
                           "n_trials": res.n_trials, "val": {}, "test": {}}  # fmt: skip
    names = ["entropy", "albox_rel", "mcbox_rel", "mc_class"]
    for split, r in rows.items():
        is_cd = cd_labels(r["iou"].to_numpy(float), r["tps_class"].to_numpy(bool),
                          res.thr_iou_thrs)  # fmt: skip
        u_all = {n: np.nan_to_num(uncertainty_values(r, n, True)) for n in names}
        u_all["combination"] = th.transform(r)
        for n, u in u_all.items():
            ev = evaluate(u, is_cd, res.thr_iou_thrs, 0.95)
            out[split][n] = {"fd_at_cd": ev["metric"], "auroc": ev["auroc"], "jsd": ev["jsd"]}
        deltas = np.array([d if d is not None else np.inf for d in res.thresholds])
        at = u_all["combination"][:, None] >= deltas[None, :]
        out[split]["combination_at_val_delta"] = {
            "fd_removed_pct": float(100 * np.mean([at[~is_cd[:, t], t].mean()
                                                   for t in range(is_cd.shape[1])])),
            "cd_kept_pct": float(100 * np.mean([1 - at[is_cd[:, t], t].mean()
                                                for t in range(is_cd.shape[1])])),
        }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-limit", type=int, default=None)
    ap.add_argument("--trials", type=int, default=1500)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = ap.parse_args()
    ckpt = prepare(args.work, args.steps, args.chunk, args.threads, args.pool_limit)
    if args.prepare_only:
        return
    run = eval_run(args.work, args.eval_images)
    val = predictions(args.work, ckpt, "val", args.threads, run)
    test = predictions(args.work, ckpt, "test", args.threads, run)
    val_pairs, test_pairs = calibration_pairs(*val), calibration_pairs(*test)
    calib, cal = calibration_report(val_pairs, test_pairs)
    frames = {k: (cal.transform(p).drop_columns(["logits", "mc_class_vec"]).to_pandas(),
                  m.to_pandas()) for k, (p, m) in {"val": val, "test": test}.items()}  # fmt: skip
    thresholding = threshold_report(frames["val"], frames["test"], args.trials)
    result = {"checkpoint": ckpt.name, "eval_run": run.path.name,
              "n_val_images": split_tables(run, "val")[0].num_rows,
              "n_test_images": split_tables(run, "test")[0].num_rows,
              "calibration": calib, "thresholding": thresholding}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=2, default=str) + "\n")
    print(json.dumps(jsonable(result), indent=2, default=str))


if __name__ == "__main__":
    main()
