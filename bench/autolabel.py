"""Auto-labeling on digits-det: the uncertainty rule (§8) against a plain score threshold.

Usage: python bench/autolabel.py [--work DIR] [--steps N] [--chunk K] [--threads 2]
                                 [--trials N] [--budgets 0.5,0.7,...] [--eval-images N]
                                 [--uncertainties ENTALBOX,ENTALBOXSCORE] [--fd-scope all]
                                 [--units detection,image]

Uses the model, data and predictions of ``bench/calibration.py`` (same --work, trained when
absent). Calibrators and thresholds are fitted on val; the test split plays the new frames.
For each budget b: the uncertainty rule auto-labels the test images whose every detection
above ``min_score`` has u < δ̄(b); the baseline a user would otherwise use, a plain score
threshold, auto-labels the same number of images, those whose lowest detection score above
``min_score`` is highest. Both label an image with its detections above ``min_score``. Two
image-level precisions at IoU 0.5, both printed and plotted:

* ``labels`` (the issue's definition): an image is correct when every auto-label is right —
  no mislocalised, misclassified, duplicate or background false positive;
* ``strict``: in addition no object of the image is missed (a missed object is an error too).

Prints both rules at equal share of images auto-labeled, as a curve over b; writes
bench/results/autolabel.json (+ .png).

Each (uncertainty set, unit) pair is a rule of its own. ``--units``: ``detection`` optimises the
weights for the detection-level FD@CD(b) of §7, ``image`` (``thresholding.thr_unit: image``) for
the same budget counted in images, each with the largest u of its detections above
``min_score`` and correct only when all of them are: the unit the rule of §8 decides on.
``--via-run B,...``: the ``ENTALBOXSCORE``/image rule also through the product, ``detloop
autolabel --checkpoint`` (an ``AutoLabelRun``) of the same model on the same images, printed
beside the direct computation (MC-dropout sampling differs: equal within noise).

Uncertainty sets: ``ENTALBOX`` is the reference's (entropy + relative aleatoric std);
``ENTALBOXSCORE`` adds ``score_gap`` = 1 − score to the combination Optuna weighs (each single
uncertainty is enqueued, so the score alone is one of its candidates). ``--eval-images`` as in
``bench/calibration.py``.
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
from calibration import DEFAULT_WORK, RESULTS, eval_run, predictions, prepare, split_tables
from detloop.data.min_score import resolve_min_score
from detloop.learners.calibration import calibration_pairs, fit_calibration_set
from detloop.orchestrator.evaluation.common import jsonable, mean_matched_score
from detloop.selectors.autolabel import decide, image_errors
from detloop.selectors.autolabel import score_rule_ids as score_rule
from detloop.selectors.threshold import CostSensitiveThresholder, threshold_rows

DEFINITIONS = {"labels": "image_precision", "strict": "image_precision_strict"}


def correct(err: pd.DataFrame) -> dict[str, pd.Series]:
    """Per image: correct under each definition of the module docstring."""
    return {"image_precision": err["fp"] == 0, "image_precision_strict": err["error_free"]}


def precision(err: pd.DataFrame, ids: list[str]) -> dict[str, float]:
    e = err[err["image_id"].isin(ids)]
    tp, fp = int(e["tp"].sum()), int(e["fp"].sum())
    out = {k: float(v.mean()) if len(e) else float("nan") for k, v in correct(e).items()}
    out["label_precision"] = tp / (tp + fp) if tp + fp else float("nan")
    return out


def fit_thresholds(b: float, rows_val: pd.DataFrame, trials: int, uncertainties: str,
                   fd_scope: str, iou_thrs: list[float], unit: str,
                   min_score: float) -> Any:  # fmt: skip
    th = CostSensitiveThresholder(uncertainties, budget=b, calibrated=True, seed=0,
                                  n_trials=trials, patience=min(trials, 300),
                                  fd_scope=fd_scope, iou_thrs=iou_thrs, unit=unit,
                                  min_score=min_score)  # fmt: skip
    return th.fit(rows_val).result()


def evaluate_rules(res: Any, test: pd.DataFrame, gt: pd.DataFrame, ids: list[str],
                   min_score: float) -> dict[str, Any]:  # fmt: skip
    """Both rules at the share the uncertainty rule reaches with budget ``b``."""
    dec = decide(test, ids, res, min_score)
    err = image_errors(dec.detections, gt, ids)
    auto = dec.ids("auto_labeled")
    base = score_rule(dec.detections, ids, len(auto))
    return {
        "b": res.thr_fpr_tpr, "delta_mean": res.threshold_mean, "weights": res.weights,
        "share_auto_labeled": len(auto) / len(ids), "n_auto_labeled": len(auto),
        "uncertainty_rule": precision(err, auto), "score_rule": precision(err, base),
        "fd_at_cd_val": res.metrics["combination"]["metric"],
    }  # fmt: skip


def score_curve(dets: pd.DataFrame, err: pd.DataFrame, ids: list[str]) -> dict[str, list[float]]:
    """The score rule at every share (n = 1..N images auto-labeled)."""
    order = score_rule(dets, ids, len(ids))
    n = np.arange(1, len(ids) + 1)
    out = {"share": (n / len(ids)).tolist()}
    for key, ok in correct(err.set_index("image_id").loc[order]).items():
        out[key] = (np.cumsum(ok.to_numpy(float)) / n).tolist()
    return out


def via_run(work: Path, ckpt: Path, n_eval: int | None, b: float, unc: str, unit: str,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """The rule through the product: ``detloop autolabel --checkpoint`` (an ``AutoLabelRun``,
    in-process) of the bench's model, validation = the bench's val split, frames = its test
    split (whose ground truth measures the auto-labels)."""
    import yaml

    from detloop.cli.main import main as detloop
    from detloop.data.digits import digits_source
    from detloop.data.io import read_json
    from detloop.data.rundir import RunsRoot

    data = work / (f"digits_eval{n_eval}" if n_eval else "digits_small")
    splits = {}
    for split, key in (("val", "val"), ("test", "pool")):
        source, images = digits_source(data, split)
        splits[key] = {"format": "coco", "source": str(source), "images": str(images)}
    name = f"via_run_{unc}_{unit}_b{b}".replace(".", "_")
    cfg = {
        "name": name, "runs_root": str(work / "autolabel_runs"), "data": splits,
        "model": {"preset": "tiny", "uncertainty": "mcdropout_lossatt"},
        "train": {"torch_threads": args.threads}, "predict": {"batch_size": 16},
        "thresholding": {"thr_sel_uncert": unc, "thr_unit": unit, "thr_fpr_tpr": b,
                         "n_trials": args.trials, "patience": min(args.trials, 300),
                         "fd_scope": args.fd_scope,
                         "thr_iou_thrs": [float(t) for t in args.iou_thrs.split(",")]},
        "ray": {"in_process": True, "shard_size": 512}, "tracking": {"enabled": False},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if detloop(["autolabel", str(path), "--checkpoint", str(ckpt)]) != 0:
        raise SystemExit("detloop autolabel failed")
    run = RunsRoot(work / "autolabel_runs").run(name, "autolabel-s0")
    report = read_json(run.metrics_file(1))["autolabel"]
    q = report["quality"]
    return {
        "run": run.name, "b": b, "rule": f"{unc}/{unit}", "delta": report["delta"],
        "min_score": report["min_score"], "share_auto_labeled": q["pct_auto_labeled"] / 100,
        "image_precision": q["image_precision"],
        "score_rule_image_precision": q["score_rule_image_precision"],
        "share_at_95": q["share_at_95"],
    }  # fmt: skip


def plot(runs: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(runs), 4 * len(DEFINITIONS)))
    for row, (definition, key) in enumerate(DEFINITIONS.items()):
        for k, (name, run) in enumerate(runs.items()):
            ax = fig.add_subplot(len(DEFINITIONS), len(runs), row * len(runs) + k + 1)
            sc = run["score_rule_curve"]
            ax.plot(sc["share"], sc[key], "-", color="0.4", label="score rule")
            for unc, rows in run["curves"].items():
                share = [r["share_auto_labeled"] for r in rows]
                ax.plot(share, [r["uncertainty_rule"][key] for r in rows], "o-",
                        label=f"{unc} rule")  # fmt: skip
                for r in rows:
                    xy = (r["share_auto_labeled"], r["uncertainty_rule"][key])
                    ax.annotate(f"{r['b']}", xy, fontsize=6)
            ax.set(xlabel="share of images auto-labeled",
                   ylabel=f"image-level precision ({definition})",
                   title=f"min_score {run['min_score']:.2f} ({name})", ylim=(0, 1))  # fmt: skip
            ax.legend(fontsize=7)
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
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--uncertainties", default="ENTALBOX,ENTALBOXSCORE")
    ap.add_argument("--fd-scope", default="all", choices=["matched", "all"])
    ap.add_argument("--units", default="detection,image", help="thr_unit values to compare")
    ap.add_argument("--iou-thrs", default="0.5,0.55,0.6,0.65,0.7,0.75", help="thr_iou_thrs")
    ap.add_argument("--out", type=Path, default=RESULTS / "autolabel.json")
    ap.add_argument("--via-run", default=None, metavar="B[,B...]",
                    help="also run ENTALBOXSCORE/image through `detloop autolabel` (an "
                    "AutoLabelRun) at these budgets, beside the direct computation")  # fmt: skip
    args = ap.parse_args()
    iou_thrs = [float(t) for t in args.iou_thrs.split(",")]
    ckpt = prepare(args.work, args.steps, args.chunk, args.threads, None)
    run = eval_run(args.work, args.eval_images)
    val = predictions(args.work, ckpt, "val", args.threads, run)
    test = predictions(args.work, ckpt, "test", args.threads, run)
    cal = fit_calibration_set(calibration_pairs(*val), "iso_percls", "iso_perclscoo")
    vdf = cal.transform(val[0]).drop_columns(["logits", "mc_class_vec"]).to_pandas()
    tdf = cal.transform(test[0]).drop_columns(["logits", "mc_class_vec"]).to_pandas()
    min_score = resolve_min_score(None, mean_matched=mean_matched_score(*val))
    test_images, gt = split_tables(run, "test")
    gt_df = gt.to_pandas()
    gt_df = gt_df[gt_df["iscrowd"] == 0]
    ids = sorted(test_images["image_id"].to_pylist())
    settings = {"validation mean score (§3)": min_score}
    settings |= {f"configured {m}": float(m) for m in args.min_scores.split(",") if m}
    result: dict[str, Any] = {
        "checkpoint": ckpt.name, "eval_run": run.path.name, "n_test_images": len(ids),
        "fd_scope": args.fd_scope, "thr_iou_thrs": iou_thrs, "trials": args.trials, "runs": {},
    }  # fmt: skip
    for name, ms in settings.items():
        rows_val = threshold_rows(vdf, val[1].to_pandas(), args.fd_scope, min_score=ms)
        kept = tdf[tdf["score"] > ms]
        errors = image_errors(kept, gt_df, ids)
        curves = {}
        for unit in (u for u in args.units.split(",") if u):
            for unc in (u for u in args.uncertainties.split(",") if u):
                fits = [fit_thresholds(float(b), rows_val, args.trials, unc, args.fd_scope,
                                       iou_thrs, unit, ms)
                        for b in args.budgets.split(",")]  # fmt: skip
                curves[f"{unc}/{unit}"] = [evaluate_rules(r, tdf, gt_df, ids, ms) for r in fits]
        result["runs"][name] = {
            "min_score": ms, "all_images_precision": precision(errors, ids),
            "score_rule_curve": score_curve(kept, errors, ids), "curves": curves,
        }  # fmt: skip
        print(f"\nmin_score {ms:.3f} ({name}); every image auto-labeled: {precision(errors, ids)}")
        for unc, curve in curves.items():
            print(f"{unc}: {'b':>5} {'share':>6} | labels: uncert. / score | "
                  "strict: uncert. / score")  # fmt: skip
            for r in curve:
                u, sc = r["uncertainty_rule"], r["score_rule"]
                print(f"{'':{len(unc)}}  {r['b']:5.2f} {r['share_auto_labeled']:6.3f} | "
                      f"{u['image_precision']:.3f} / {sc['image_precision']:.3f}"
                      f"{' (+)' if u['image_precision'] > sc['image_precision'] else ''} | "
                      f"{u['image_precision_strict']:.3f} / "
                      f"{sc['image_precision_strict']:.3f}")  # fmt: skip
    if args.via_run:
        result["via_run"] = []
        for b in (float(x) for x in args.via_run.split(",")):
            r = via_run(args.work, ckpt, args.eval_images, b, "ENTALBOXSCORE", "image", args)
            result["via_run"].append(r)
            print(f"AutoLabelRun ENTALBOXSCORE/image b={b}: share {r['share_auto_labeled']:.3f}, "
                  f"image precision {r['image_precision']:.3f} (score rule at the same share "
                  f"{r['score_rule_image_precision']:.3f}); share at >= 95 %: "
                  f"{r['share_at_95']:.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=2, default=str) + "\n")
    plot(result["runs"], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
