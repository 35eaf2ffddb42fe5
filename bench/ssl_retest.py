"""Re-test stored SSL models on another test split, and compare selections paired over seeds.

The SSL benches evaluate on digits-det small's long-tailed test split (r = 0.7: 300 images, 13
test boxes in each of the two rarest classes, whose APs are a fifth of mAP). This script takes
the runs those benches left (``runs/bench_ssl_*``), predicts the split given by ``--test`` with
every model they stored — the teacher (iteration 0), the student (1), a self-training round (2)
— under each run's own stored config, and reports:

- per root and variant: test mAP on the new split (mean ± std over seeds) and its paired gain
  over the seed's teacher, beside the mAP the bench stored on its own test split;
- for each ``--pairs A:B`` (variants, i.e. run names without ``-s<seed>``): A − B per seed,
  pooled over every root that holds both, with a paired bootstrap 95 % interval and the
  Wilcoxon p-value — on the new split and on the stored one, so the two splits' noise can be
  told apart.

A class-balanced test split of the same data (``detloop make-dataset digits --balanced-test``)
keeps the pool and val files byte-identical, so every stored model is valid on it. Identical
checkpoints (a teacher copied from the warm-up cache into each variant) are evaluated once.

    python bench/ssl_retest.py --test data/digits-small-imb07-bt \
        --roots runs/bench_ssl_plateau,runs/bench_ssl_s3000 \
        --pairs pcorrect+p0.9+weakaug+from_teacher:score+p0.9+weakaug+from_teacher
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchkit import REPO, RESULTS, local_env, seed_stats, write_result

ROLES = {0: "teacher", 1: "student", 2: "round2"}
_SEED = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def split_of(test: Path, tmp: Path) -> tuple[Any, Any, Any]:
    """Images, ground truth and categories of ``test``'s test split, imported into a scratch run."""
    from detloop.data.importer import import_source
    from detloop.data.rundir import RunDir
    from detloop.data.splits import split_tables

    run = RunDir(tmp / "retest")
    import_source(run, "coco", test / "test.json", "test", images=test / "images" / "test")
    images, gt = split_tables(run, "test")
    return images, gt, run.read_categories()


def stored_models(roots: list[Path]) -> list[dict[str, Any]]:
    """One record per stored checkpoint: root, variant, seed, iteration, role, path, and the
    test mAP the bench measured on its own split."""
    from detloop.data.io import read_json

    out = []
    for root in roots:
        for run in sorted((root / "ssl_bench").glob("ssl-*")):
            m = _SEED.match(run.name.removeprefix("ssl-"))
            if m is None or not (run / "run.json").exists():
                continue
            for it, role in ROLES.items():
                ckpt = run / f"iter_{it:04d}" / "checkpoint"
                if not (ckpt / "model.pt").exists():
                    continue
                metrics_file = run / f"iter_{it:04d}" / "metrics.json"
                metrics = read_json(metrics_file) if metrics_file.exists() else {}
                out.append(
                    {
                        "root": root.name,
                        "variant": m["variant"],
                        "seed": int(m["seed"]),
                        "iteration": it,
                        "role": role,
                        "run": str(run),
                        "checkpoint": str(ckpt),
                        "stored_test_map": metrics.get("test_map"),
                    }
                )
    return out


def _evaluate(
    rec: dict[str, Any], tables: tuple[Any, Any, Any], seeds: list[int]
) -> dict[str, Any]:
    """mAP, mAP50 and per-class AP of one checkpoint, averaged over MC-dropout prediction
    seeds (``map_by_seed`` keeps each: the evaluation's own noise)."""
    from detloop.data.rundir import RunDir
    from detloop.learners.evaluate_run import evaluate_predictions
    from detloop.learners.predict import Predictor
    from detloop.orchestrator.engine.runs import stored_config

    images, gt, categories = tables
    run = RunDir(Path(rec["run"]))
    cfg = stored_config(run)
    predictor = Predictor.from_checkpoint(
        Path(rec["checkpoint"]), cfg, class_names=run.class_names()
    )
    per_seed = []
    for seed in seeds:
        per_seed.append(
            evaluate_predictions(predictor.predict(images, seed=seed), gt, images, categories)
        )
    classes = sorted(k for k in per_seed[0] if k.startswith("ap/"))
    return {
        "map": float(np.mean([m["map"] for m in per_seed])),
        "map50": float(np.mean([m["map50"] for m in per_seed])),
        "map_by_seed": [float(m["map"]) for m in per_seed],
        "ap": {k[3:]: float(np.nanmean([m[k] for m in per_seed])) for k in classes},
    }


def evaluate_all(records: list[dict[str, Any]], test: Path, seeds: list[int]) -> None:
    """Fill each record's ``map``, ``map50`` and per-class ``ap`` on ``test`` (in place)."""
    import torch

    torch.set_num_threads(1)
    done: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tables = split_of(test, Path(tmp))
        for i, rec in enumerate(records):
            key = _sha(Path(rec["checkpoint"]) / "model.pt")
            if key not in done:
                t0 = time.perf_counter()
                done[key] = {**_evaluate(rec, tables, seeds), "seconds": time.perf_counter() - t0}
                print(
                    f"[{i + 1}/{len(records)}] {rec['root']} {rec['variant']} s{rec['seed']} "
                    f"{rec['role']}: mAP {done[key]['map']:.4f} "
                    f"({' '.join(f'{m:.4f}' for m in done[key]['map_by_seed'])}; stored test "
                    f"{rec['stored_test_map'] or float('nan'):.4f}) {done[key]['seconds']:.0f} s",
                    flush=True,
                )
            rec.update(done[key], sha=key)


def final_models(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(root, variant, seed) -> the run's last model (its student, or its last round)."""
    finals: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        key = (r["root"], r["variant"], r["seed"])
        later = key not in finals or r["iteration"] > finals[key]["iteration"]
        if r["role"] != "teacher" and later:
            finals[key] = r
    return finals


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per root and variant: the final model's mAP on the new split (and the stored one) and
    its paired relative gain over the seed's teacher, in %."""
    teachers = {(r["root"], r["seed"]): r for r in records if r["role"] == "teacher"}
    finals = final_models(records)
    out: dict[str, Any] = {}
    for (root, variant, _seed), r in sorted(finals.items()):
        entry = out.setdefault(root, {}).setdefault(variant, {"seeds": [], "map": [], "gain": []})
        teacher = teachers.get((root, r["seed"]))
        entry["seeds"].append(r["seed"])
        entry["map"].append(r["map"])
        entry.setdefault("stored_map", []).append(r["stored_test_map"])
        if teacher is not None:
            entry["gain"].append(100 * (r["map"] / teacher["map"] - 1))
    for root, variants in out.items():
        t = [r["map"] for (rt, _), r in teachers.items() if rt == root]
        variants["teacher"] = {"map": seed_stats(t)}
        for variant, e in variants.items():
            if variant == "teacher":
                continue
            e["map_stats"] = seed_stats(e["map"])
            e["gain_stats"] = seed_stats(e["gain"]) if e["gain"] else None
    return out


def pooled_pairs(records: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A − B of the final models, per (root, seed) holding both, pooled: on the new split and
    on the stored split (relative %, paired bootstrap interval and Wilcoxon p)."""
    from detloop.selectors.label_efficiency import paired_comparison

    final = final_models(records)
    out: dict[str, Any] = {}
    for a, b in pairs:
        both = sorted(
            (root, seed) for root, v, seed in final if v == a and (root, b, seed) in final
        )
        if len(both) < 2:
            out[f"{a} vs {b}"] = {"n": len(both)}
            continue
        entry: dict[str, Any] = {"pairs": [f"{root}/s{seed}" for root, seed in both]}
        for split, field in (("new", "map"), ("stored", "stored_test_map")):
            va = [final[(root, a, s)][field] for root, s in both]
            vb = [final[(root, b, s)][field] for root, s in both]
            if any(v is None for v in va + vb):
                continue
            rel = [100 * (x / y - 1) for x, y in zip(va, vb, strict=True)]
            cmp = paired_comparison(rel, [0.0] * len(rel))
            entry[split] = {
                "rel_pct": rel,
                "mean": cmp.mean_diff,
                "std": float(np.std(rel, ddof=1)),
                "ci": [cmp.ci_low, cmp.ci_high],
                "p_value": cmp.p_value,
                "wins": int(sum(d > 0 for d in rel)),
            }
        out[f"{a} vs {b}"] = entry
    return out


def print_report(summary: dict[str, Any], pairs: dict[str, Any]) -> None:
    for root, variants in summary.items():
        t = variants["teacher"]["map"]
        print(f"\n{root}: teacher {t['mean']:.4f} ± {t['std']:.4f} (n={t['n']})")
        for variant, e in variants.items():
            if variant == "teacher":
                continue
            m, g = e["map_stats"], e["gain_stats"]
            gain = f"{g['mean']:+.1f} ± {g['std']:.1f} %" if g else "-"
            print(f"  {variant:<48} {m['mean']:.4f} ± {m['std']:.4f}  vs teacher {gain}")
    print("\npooled pairs (A − B, relative %):")
    for name, e in pairs.items():
        print(f"  {name} ({len(e.get('pairs', []))} pairs)")
        for split in ("new", "stored"):
            if split in e:
                s = e[split]
                print(
                    f"    {split:<7} {s['mean']:+.2f} ± {s['std']:.2f} "
                    f"[{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}] p={s['p_value']:.3f} "
                    f"wins {s['wins']}/{len(s['rel_pct'])}"
                )


def plot(pairs: dict[str, Any], path: Path) -> None:
    """Each pair's per-seed A − B (relative %) on the new and the stored test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in pairs.items() if "new" in e]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(names)))
    for i, name in enumerate(names):
        for split, dy, color in (("new", 0.15, "tab:blue"), ("stored", -0.15, "tab:gray")):
            e = pairs[name].get(split)
            if e is None:
                continue
            y = np.full(len(e["rel_pct"]), i + dy)
            ax.scatter(e["rel_pct"], y, s=14, color=color, alpha=0.6)
            err = [[e["mean"] - e["ci"][0]], [e["ci"][1] - e["mean"]]]
            label = split if i == 0 else None
            ax.errorbar(e["mean"], i + dy, xerr=err, fmt="D", color=color, capsize=3, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), [n.replace(" vs ", "\nvs ") for n in names], fontsize=7)
    ax.set_xlabel("A − B test mAP, relative % (points: paired seeds; diamond: mean, 95 % CI)")
    ax.set_title("SSL selections paired over seeds: new test split (blue) vs stored (grey)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--test", type=Path, required=True, help="dataset folder with test.json")
    parser.add_argument("--roots", required=True, help="comma-separated bench runs roots")
    parser.add_argument("--pairs", default="", help="comma-separated A:B variant pairs")
    parser.add_argument(
        "--pred-seeds", default="0,1,2", help="MC-dropout prediction seeds averaged per model"
    )
    parser.add_argument("--out", default="ssl_retest", help="bench/results/<out>.json")
    parser.add_argument(
        "--replot", action="store_true", help="summarise and plot <out>.json's records again"
    )
    args = parser.parse_args()
    local_env()
    roots = [REPO / r if not Path(r).is_absolute() else Path(r) for r in args.roots.split(",") if r]
    if any(p.count(":") != 1 for p in args.pairs.split(",") if p):
        raise SystemExit("--pairs: A:B,C:D")
    pairs = [(a, b) for a, b in (p.split(":") for p in args.pairs.split(",") if p)]
    t0 = time.perf_counter()
    wall = None
    if args.replot:  # the evaluation's records (and its wall time) as they were written
        stored = json.loads((RESULTS / f"{args.out}.json").read_text())
        records, wall = stored["records"], stored["wall_s"]
    else:
        records = stored_models(roots)
        if not records:
            raise SystemExit(f"no stored SSL models under {', '.join(map(str, roots))}")
        evaluate_all(records, args.test, [int(x) for x in args.pred_seeds.split(",") if x])
    summary = summarise(records)
    pooled = pooled_pairs(records, pairs)
    print_report(summary, pooled)
    path = write_result(
        args.out,
        {
            "test": args.test.name,
            "pred_seeds": args.pred_seeds,
            "roots": [r.name for r in roots],
            "records": [
                {k: v for k, v in r.items() if k not in ("run", "checkpoint")} for r in records
            ],
            "summary": summary,
            "pairs": pooled,
            "wall_s": time.perf_counter() - t0 if wall is None else wall,
        },
    )
    plot(pooled, path.with_suffix(".png"))
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    main()
