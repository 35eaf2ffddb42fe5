"""Selection at million-image scale (issue 4 acceptance figures).

1. A synthetic predictions table of 1,000,000 images and 10,000,000 detections (schema-valid,
   calibrated twins present). For each of ``entropy``, ``perc_calib_norm_mean_albox``,
   ``alluncert``, ``sota`` and ``nee_entropy``, a fresh process reads the tables and selects a
   5 % budget; the select() time and the process's peak RSS are reported.
   Targets: <= 5 s and <= 4 GB each.
2. Each strategy's selection on a 10,000-image subset equals a straightforward pandas
   reference implementation (groupby/apply, written from ALGORITHMS §9 independently).
3. Exact-duplicate pruning of 1,000,000 hashes (target <= 5 s) and near-duplicate pruning
   (prune_thr 0.1) of 100,000 hashes (reported).

Prints the figures and writes them to ``bench/results/selection_scale.json``.
Usage: ``python bench/selection_scale.py [--images 1000000] [--dets 10000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

RESULTS = Path(
    os.environ.get(
        "SELECTION_SCALE_OUT", Path(__file__).resolve().parent / "results" / "selection_scale.json"
    )
)
STRATEGIES = ["entropy", "perc_calib_norm_mean_albox", "alluncert", "sota", "nee_entropy"]
MIN_SCORE = 0.4
SUBSET = 10_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- workers (fresh processes) ---------------------------------------------------------------


def worker_select(folder: Path, strategy: str, budget: int) -> dict[str, Any]:
    from detloop.selectors.pipeline import SelectContext, select

    t0 = time.perf_counter()
    preds = pq.read_table(folder / "predictions.parquet")
    images = pq.read_table(folder / "images.parquet")
    t1 = time.perf_counter()
    ctx = SelectContext(min_score=MIN_SCORE, rng=np.random.default_rng(0), iteration=1)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    table = select(preds, images, strategy, budget, ctx)
    t2 = time.perf_counter()
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "strategy": strategy,
        "read_s": round(t1 - t0, 3),
        "select_s": round(t2 - t1, 3),
        "select_cpu_s": round(r2.ru_utime - r1.ru_utime + r2.ru_stime - r1.ru_stime, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "selected": int(pc.sum(table["selected"]).as_py()),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def worker_prune(n: int, thr: float) -> dict[str, Any]:
    from detloop.data.synthetic import image_ids, synthetic_images
    from detloop.selectors.prune import prune_ids

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    planted = n // 100
    h[n - planted :] = h[:planted] ^ np.uint64(1 if thr > 0 else 0)  # 1 % (near) duplicates
    images = synthetic_images(image_ids(n), phash=h)
    t0 = time.perf_counter()
    removed = prune_ids(images, threshold=thr, random=False, rng=np.random.default_rng(1))
    t1 = time.perf_counter()
    return {
        "hashes": n,
        "prune_thr": thr,
        "seconds": round(t1 - t0, 3),
        "removed": len(removed),
        "planted": planted,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def run_worker(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- pandas reference (independent, straightforward) -----------------------------------------


def _rel(df: pd.DataFrame, head: str, cal: bool) -> pd.Series:
    s = "_cal" if cal else ""
    w = (df["x2"].astype("f8") - df["x1"]).clip(lower=1e-6)
    h = (df["y2"].astype("f8") - df["y1"]).clip(lower=1e-6)
    parts = [df[f"{head}_x1{s}"] / w, df[f"{head}_y1{s}"] / h]
    parts += [df[f"{head}_x2{s}"] / w, df[f"{head}_y2{s}"] / h]
    return sum(p.astype("f8") for p in parts) / 4.0


def reference_scores(df: pd.DataFrame, strategy: str) -> pd.Series:
    df = df[df["score"] > np.float32(MIN_SCORE)].copy()
    if strategy in ("entropy", "nee_entropy"):
        return df.groupby("image_id")["entropy"].max().astype("f8")
    if strategy == "perc_calib_norm_mean_albox":
        df["u"] = _rel(df, "al", cal=True)
        score = df.groupby("image_id")["u"].mean()
        w_c = len(df) / df["class_id"].value_counts()
        img_w = df.groupby("image_id")["class_id"].apply(lambda c: w_c[c.unique()].mean())
        return score * img_w
    df["c0"], df["c1"], df["c2"] = _rel(df, "mc", False), _rel(df, "al", False), df["mc_class"]
    comp = df.groupby("image_id")[["c0", "c1", "c2"]].max().astype("f8")
    if strategy == "alluncert":
        span = comp.max() - comp.min()
        return ((comp - comp.min()) / span.where(span > 0)).fillna(0.0).sum(axis=1)
    z = (comp - comp.mean()) / comp.std(ddof=0)
    return z.fillna(0.0).max(axis=1)


def reference_selection(df: pd.DataFrame, strategy: str, budget: int) -> set[str]:
    scores = reference_scores(df, strategy).sort_index()
    if strategy != "nee_entropy":
        order = sorted(scores.index, key=lambda i: (-scores[i], i))
        return set(order[:budget])
    asc = sorted(scores.index, key=lambda i: (scores[i], i))
    bins = np.array_split(np.array(asc, dtype=object), 5)
    k = budget // 5
    chosen = [x for b in bins[:-1] for x in b[len(b) - k :]] + list(bins[-1][: k + budget % 5])
    return set(chosen)


def check_subset(folder: Path) -> dict[str, Any]:
    from detloop.selectors.pipeline import SelectContext, select

    preds = pq.read_table(folder / "predictions.parquet")
    images = pq.read_table(folder / "images.parquet").slice(0, SUBSET)
    last = images["image_id"][SUBSET - 1].as_py()
    sub = preds.filter(pc.less_equal(preds["image_id"], last))
    del preds
    df = sub.drop_columns(["logits", "mc_class_vec"]).to_pandas()
    budget = SUBSET // 20
    out = {}
    for strategy in STRATEGIES:
        ctx = SelectContext(min_score=MIN_SCORE, rng=np.random.default_rng(0))
        table = select(sub, images, strategy, budget, ctx)
        ours = set(table.filter(table["selected"])["image_id"].to_pylist())
        ref = reference_selection(df, strategy, budget)
        ref_scores = reference_scores(df, strategy).sort_index()
        mine = table.filter(pc.is_valid(table["score"])).sort_by("image_id")
        close = np.allclose(mine["score"].to_numpy(), ref_scores.to_numpy(), rtol=1e-9)
        out[strategy] = {"equal_selection": ours == ref, "scores_close": bool(close)}
    return out


# ---- main ------------------------------------------------------------------------------------


def generate(folder: Path, n_images: int, n_dets: int) -> float:
    from detloop.data.synthetic import synthetic_predictions

    t0 = time.perf_counter()
    preds, images = synthetic_predictions(n_images, n_dets, np.random.default_rng(0))
    pq.write_table(preds, folder / "predictions.parquet", compression="zstd")
    pq.write_table(images, folder / "images.parquet", compression="zstd")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--dets", type=int, default=10_000_000)
    parser.add_argument("--near-hashes", type=int, default=100_000)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        res = (
            worker_select(Path(rest[0]), rest[1], int(rest[2]))
            if kind == "select"
            else (worker_prune(int(rest[0]), float(rest[1])))
        )
        print(json.dumps(res))
        return 0
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "images": args.images,
        "detections": args.dets,
        "min_score": MIN_SCORE,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results["generate_s"] = round(generate(folder, args.images, args.dets), 2)
        print(
            f"generated {args.images:,} images / {args.dets:,} detections"
            f" in {results['generate_s']} s"
        )
        budget = args.images // 20
        runs = []
        for strategy in STRATEGIES:
            r = run_worker(["select", str(folder), strategy, str(budget)])
            r["ok"] = r["select_s"] <= 5.0 and r["peak_rss_mb"] <= 4096
            runs.append(r)
            print(
                f"{strategy:<28} select {r['select_s']:6.2f} s (cpu {r['select_cpu_s']:.2f} s,"
                f" load {r['load_avg_1min']})  peak RSS {r['peak_rss_mb']:7.0f} MB"
                f"  (read {r['read_s']:.2f} s, selected {r['selected']:,})"
                f"  {'ok' if r['ok'] else 'FAIL'}"
            )
        results["select"] = runs
        results["subset_check"] = check_subset(folder)
        for strategy, c in results["subset_check"].items():
            print(f"{strategy:<28} pandas reference on {SUBSET:,} images: {c}")
    exact = run_worker(["prune", str(args.images), "0"])
    exact["ok"] = exact["seconds"] <= 5.0
    near = run_worker(["prune", str(args.near_hashes), "0.1"])
    results["prune_exact"], results["prune_near"] = exact, near
    print(
        f"exact-duplicate pruning of {exact['hashes']:,} hashes: {exact['seconds']} s "
        f"(removed {exact['removed']:,} of {exact['planted']:,} planted)"
    )
    print(
        f"near-duplicate pruning (prune_thr 0.1) of {near['hashes']:,} hashes: {near['seconds']} s "
        f"(removed {near['removed']:,}, planted {near['planted']:,})"
    )
    results["all_ok"] = (
        all(r["ok"] for r in runs)
        and exact["ok"]
        and all(all(c.values()) for c in results["subset_check"].values())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"all targets met: {results['all_ok']}; written to {RESULTS}")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
