"""Auto-labeling on digits-det: the uncertainty rule (§8) against a plain score threshold.

Usage: python bench/autolabel.py [--work DIR] [--steps N] [--chunk K] [--threads 2]
                                 [--trials N] [--budgets 0.5,0.7,...]

Uses the model, data and predictions of ``bench/calibration.py`` (same --work, trained when
absent). Calibrators and thresholds are fitted on val; the test split plays the new frames.
For each budget b: the uncertainty rule auto-labels the test images whose every detection
above ``min_score`` has u < δ̄(b); the baseline a user would otherwise use, a plain score
threshold, auto-labels the same number of images, those whose lowest detection score above
``min_score`` is highest. Both label an image with its detections above ``min_score``; an image
counts as correct only if those labels have no error at IoU 0.5 (background false positives
and missed objects included). Prints the image-level precision of both rules at equal share of
images auto-labeled, as a curve over b; writes bench/results/autolabel.json (+ .png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))  # the sibling bench/calibration.py
from calibration import DEFAULT_WORK, RESULTS, predictions, prepare, split_tables
from detloop.config import ExperimentConfig
from detloop.data.rundir import RunDir
from detloop.learners.calibration import calibration_pairs, fit_calibration_set
from detloop.orchestrator.validation_common import (
    jsonable,
    mean_matched_score,
    min_score_for,
)
from detloop.selectors.autolabel import decide, image_errors
from detloop.selectors.threshold import CostSensitiveThresholder, threshold_rows


def score_rule(dets: pd.DataFrame, ids: list[str], n: int) -> list[str]:
    """The ``n`` images whose lowest considered score is highest (no detection = +inf)."""
    low = dets.groupby("image_id")["score"].min()
    key = pd.Series([float(low.get(i, np.inf)) for i in ids], index=ids)
    order = sorted(ids, key=lambda i: (-key[i], i))
    return order[:n]


def precision(err: pd.DataFrame, ids: list[str]) -> dict[str, float]:
    e = err[err["image_id"].isin(ids)]
    tp, fp = int(e["tp"].sum()), int(e["fp"].sum())
    return {
        "image_precision": float(e["error_free"].mean()) if len(e) else float("nan"),
        "label_precision": tp / (tp + fp) if tp + fp else float("nan"),
    }


def fit_thresholds(b: float, rows_val: pd.DataFrame, trials: int) -> Any:
    th = CostSensitiveThresholder("ENTALBOX", budget=b, calibrated=True, seed=0,
                                  n_trials=trials, patience=min(trials, 300))  # fmt: skip
    return th.fit(rows_val).result()


def evaluate_rules(res: Any, b: float, test: pd.DataFrame, gt: pd.DataFrame, ids: list[str],
                   min_score: float) -> dict[str, Any]:  # fmt: skip
    """Both rules at the share the uncertainty rule reaches with budget ``b``."""
    dec = decide(test, ids, res, min_score)
    err = image_errors(dec.detections, gt, ids)
    auto = dec.ids("auto_labeled")
    base = score_rule(dec.detections, ids, len(auto))
    return {
        "b": b, "delta_mean": res.threshold_mean, "weights": res.weights,
        "share_auto_labeled": len(auto) / len(ids), "n_auto_labeled": len(auto),
        "uncertainty_rule": precision(err, auto), "score_rule": precision(err, base),
        "fd_at_cd_val": res.metrics["combination"]["metric"],
    }  # fmt: skip


def plot(runs: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(runs), 4))
    for k, (name, run) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), k + 1)
        rows = run["curve"]
        share = [r["share_auto_labeled"] for r in rows]
        for key, label in (("uncertainty_rule", "uncertainty rule"), ("score_rule", "score rule")):
            ax.plot(share, [r[key]["image_precision"] for r in rows], "o-", label=label)
        for r in rows:
            xy = (r["share_auto_labeled"], r["uncertainty_rule"]["image_precision"])
            ax.annotate(f"b={r['b']}", xy, fontsize=6)
        ax.set(xlabel="share of images auto-labeled", ylabel="image-level precision",
               title=f"min_score {run['min_score']} ({name})")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=1500)
    ap.add_argument("--budgets", default="0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.99")
    ap.add_argument("--min-scores", default="0.3,0.5", help="configured min_score values too")
    ap.add_argument("--out", type=Path, default=RESULTS / "autolabel.json")
    args = ap.parse_args()
    ckpt = prepare(args.work, args.steps, args.chunk, args.threads, None)
    val = predictions(args.work, ckpt, "val", args.threads)
    test = predictions(args.work, ckpt, "test", args.threads)
    cal = fit_calibration_set(calibration_pairs(*val), "iso_percls", "iso_perclscoo")
    vdf = cal.transform(val[0]).drop_columns(["logits", "mc_class_vec"]).to_pandas()
    tdf = cal.transform(test[0]).drop_columns(["logits", "mc_class_vec"]).to_pandas()
    min_score = min_score_for(ExperimentConfig(), mean_matched_score(*val))
    _, gt = split_tables(RunDir(args.work / "run"), "test")
    gt_df = gt.to_pandas()
    ids = sorted(split_tables(RunDir(args.work / "run"), "test")[0]["image_id"].to_pylist())
    gt_df = gt_df[gt_df["iscrowd"] == 0]
    rows_val = threshold_rows(vdf, val[1].to_pandas(), "matched")
    fits = {
        float(b): fit_thresholds(float(b), rows_val, args.trials) for b in args.budgets.split(",")
    }
    settings = {"validation mean score (§3)": min_score}
    settings |= {f"configured {m}": float(m) for m in args.min_scores.split(",") if m}
    result: dict[str, Any] = {"checkpoint": ckpt.name, "n_test_images": len(ids), "runs": {}}
    for name, ms in settings.items():
        curve = [evaluate_rules(res, b, tdf, gt_df, ids, ms) for b, res in fits.items()]
        everything = precision(image_errors(tdf[tdf["score"] > ms], gt_df, ids), ids)
        result["runs"][name] = {"min_score": ms, "all_images_precision": everything, "curve": curve}
        print(f"\nmin_score {ms} ({name}); precision with every image auto-labeled: {everything}")
        print(f"{'b':>5} {'share':>6} {'uncert. prec':>12} {'score prec':>10}")
        for r in curve:
            print(f"{r['b']:5.2f} {r['share_auto_labeled']:6.3f} "
                  f"{r['uncertainty_rule']['image_precision']:12.3f} "
                  f"{r['score_rule']['image_precision']:10.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=2, default=str) + "\n")
    plot(result["runs"], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
