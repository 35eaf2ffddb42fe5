"""The SSL building blocks measured (ALGORITHMS §11.3–§11.9) on digits-det small with class
imbalance r = 0.5 (so rare classes exist), 10 % labeled, several seeds; mean ± std.

Per seed, every arm is a real SSL run (``configs/ssl_demo.yaml``, in-process workers) on the
same seeded labeled split; arms that share the plain teacher get it from the teacher cache:

    teachers  plain, rcc, curriculum_learning (RCF batches), imscore (RCF weights): test mAP
              and the test AP of the three rarest classes (by pool count)
    glc       the GLC stress test: the labeled boxes corrupted (seeded: 20 % dropped, random
              boxes added, 20 % shifted/resized), a teacher trained on them labels its own
              training images in consistency mode, GLC corrects them, a teacher is retrained
              on the corrected set: precision/recall of the recovered missing, false and
              noisy boxes, and test mAP clean vs corrupted vs corrected; ``--glc-min-score``
              and ``--glc-rules`` set the teacher's score floor (§11.5: 0.1) and the rules
              applied (default all three), their corrected teachers in their own experiment;
              ``--glc-folds K`` judges each image by a teacher trained on the other K − 1
              folds' corrupted labels instead (out-of-fold; K more teachers a seed)
    pls       the plain teacher's pseudo-labels: AUC of D (and S, C) against "the image has a
              missed object"; students on the top 40 % of images by D vs `rand` vs `bot`
    3d        the six oracle variants (nofd, nomd, nomdfd, fixmd, highprec, nonoise), each a
              student, beside the plain student
    csd       the CSD student (flip consistency on labeled + unlabeled images) vs the
              supervised teacher of the same labeled split

Prints a table, writes bench/results/ssl_blocks.json and ssl_blocks.png.

    python bench/ssl_blocks.py [--seeds 0,1,2] [--parts teachers,glc,pls,3d,csd]
        [--steps 500] [--jobs 2] [--balanced-test] [--tag T] [--set train.max_steps=1000]

``--steps`` is the training budget of every model (the demo config's is 1,000; the default 500
keeps 3 seeds of every part, two seeds side by side with one torch thread each, near an hour on
2 CPU cores). Runs are resumed, so an interrupted bench picks up where it stopped.

At r = 0.5 the test split holds 1-2 boxes of each of the three rarest classes: their AP is 0 or
1 per box. ``--balanced-test`` draws the test split's classes uniformly (pool and val as before,
as long-tail benchmarks do; ~90 test boxes a class), so the rare-class AP of the teachers part
is a measurement (results as ssl_blocks_<tag>.json with ``--tag``):

    python bench/ssl_blocks.py --parts teachers --steps 3000 --balanced-test --tag bt3000 --jobs 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from benchkit import (
    REPO,
    RESULTS,
    data_sets,
    digits_data,
    local_env,
    run_loop,
    seed_stats,
    ssl_round_figures,
    write_result,
)

TEACHERS = {
    "plain": "",
    "rcc": "rcc",
    "curriculum": "curriculum_learning",
    "imscore": "imscore",
}
PLS = ("top", "rand", "bot")
VARIANTS = ("nofd", "nomd", "nomdfd", "fixmd", "highprec", "nonoise")
PARTS = ("teachers", "glc", "pls", "3d", "csd")
NAME = "ssl_blocks"
NAMES = (NAME, "ssl_blocks_glc_corrupted", "ssl_blocks_glc_corrected")


class Bench:
    """The runs of one bench invocation (config, data, budget)."""

    def __init__(self, args: argparse.Namespace, data: Path) -> None:
        self.args = args
        self.data = data

    def config(self, name: str, seed: int, sets: list[str], pool: Path | None = None) -> Any:
        from detloop.config import load_config

        base = [
            f"name={name}",
            f"runs_root={self.args.runs_root}",
            f"seed={seed}",
            "ray.in_process=true",
            "ssl.selftrain_rounds=0",
            f"train.max_steps={self.args.steps}",
            f"train.epochs={self.args.steps}",  # an epoch is ≥ 1 step: the step cap decides
            "train.torch_threads=1",
            "model.mc_dropoutsamp=2",
            *data_sets(self.data, pool),
        ]
        return load_config(REPO / "configs" / "ssl_demo.yaml", [*base, *sets, *self.args.overrides])

    def run(self, name: str, seed: int, sets: list[str], pool: Path | None = None) -> Any:
        label = f"{name} seed {seed}: {' '.join(sets)}"
        return run_loop(self.config(name, seed, sets, pool), label)


def _metrics(run: Any, it: int) -> dict[str, Any]:
    from detloop.data.io import read_json

    out: dict[str, Any] = read_json(run.metrics_file(it))
    return out


def rarest_classes(data: Path, k: int = 3) -> list[str]:
    """Names of the ``k`` classes with the fewest pool boxes (ties by name)."""
    coco = json.loads((data / "pool.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts = {n: 0 for n in names.values()}
    for a in coco["annotations"]:
        counts[names[a["category_id"]]] += 1
    return sorted(counts, key=lambda n: (counts[n], n))[:k]


def _teacher_record(run: Any, rare: list[str]) -> dict[str, float]:
    m = _metrics(run, 0)
    out = {"map": float(m["test_map"]), "map50": float(m["test_map50"])}
    aps = [float(m.get(f"test_ap/{c}", float("nan"))) for c in rare]
    out["rare_ap"] = float(np.nanmean(aps)) if not all(a != a for a in aps) else float("nan")
    out.update({f"ap_{c}": a for c, a in zip(rare, aps, strict=True)})
    return out


def part_teachers(bench: Bench, seed: int, rare: list[str]) -> dict[str, Any]:
    out = {}
    for arm, strategy in TEACHERS.items():
        sets = ["ssl.teacher_only=true", f"ssl.teacher_strategy={strategy}"]
        if strategy == "rcc":
            sets.append(f"ssl.rcc_classes={json.dumps(rare)}")
        out[arm] = _teacher_record(bench.run("ssl_blocks", seed, sets), rare)
    return out


def _student_record(run: Any) -> dict[str, float]:
    """The student's test mAP and its pseudo-labels' count, precision and recall (IoU 0.5
    against the hidden ground truth), as the loop logged them."""
    row = ssl_round_figures(run)[1]
    return {k: v for k, v in row.items() if k != "val_map"}


def summarise(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over seeds of every numeric field of every arm of every part."""
    out: dict[str, Any] = {}
    for part, by_seed in records.items():
        arms: dict[str, dict[str, list[float]]] = {}
        for rec in by_seed.values():
            for arm, fields in rec.items():
                for key, value in fields.items():
                    if isinstance(value, int | float):
                        arms.setdefault(arm, {}).setdefault(key, []).append(float(value))
        out[part] = {
            arm: {k: seed_stats(v) for k, v in fields.items()} for arm, fields in arms.items()
        }
    return out


def _pm(d: dict[str, float] | None, fmt: str = ".4f") -> str:
    if not d or d["n"] == 0:
        return "-"
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"


def table(summary: dict[str, Any], columns: dict[str, list[str]]) -> str:
    lines = []
    for part, arms in summary.items():
        cols = columns.get(part) or sorted({k for f in arms.values() for k in f})
        lines.append(f"-- {part}")
        lines.append(f"{'arm':<12}" + "".join(f"{c:>22}" for c in cols))
        for arm, fields in arms.items():
            lines.append(f"{arm:<12}" + "".join(f"{_pm(fields.get(c)):>22}" for c in cols))
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, balanced_test: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in summary if summary[p]]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        arms = [a for a in summary[part] if "map" in summary[part][a]]
        means = [summary[part][a]["map"]["mean"] for a in arms]
        stds = [summary[part][a]["map"]["std"] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=3, color="C0")
        if part == "teachers":
            rare = [summary[part][a].get("rare_ap", {}).get("mean", np.nan) for a in arms]
            ax.plot(arms, rare, "o", color="C3", label="AP of the 3 rarest classes")
            ax.legend(fontsize=7)
        ax.set_title(f"{part}: test mAP (mean ± std)")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    test = ", balanced test split" if balanced_test else ""
    fig.suptitle(f"SSL building blocks on digits-det small (r = 0.5{test}), 10 % labeled")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_pool_with(
    data: Path, run: Any, labels: Any, out: Path, only: list[str] | None = None
) -> Path:
    """``data``'s pool.json with the annotations of the run's labeled images replaced by
    ``labels`` (run rows: image_id, class_id, x1..y2); every other image keeps its boxes.
    With ``only`` (run image ids) the pool is those images alone."""
    coco = json.loads((data / "pool.json").read_text())
    images = run.read_images()
    file_of = {
        i: Path(f).name
        for i, f in zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True)
    }
    coco_id = {im["file_name"]: im["id"] for im in coco["images"]}
    cats = run.read_categories()
    cat_of = {
        c: next(k["id"] for k in coco["categories"] if k["name"] == n)
        for c, n in zip(cats["class_id"].to_pylist(), cats["name"].to_pylist(), strict=True)
    }
    replaced = {coco_id[file_of[i]] for i in set(labels["image_id"].to_pylist())}
    replaced |= {coco_id[file_of[i]] for i in _labeled_ids(run)}
    anns = [a for a in coco["annotations"] if a["image_id"] not in replaced]
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    for row in labels.to_pylist():
        x1, y1, x2, y2 = (float(row[c]) for c in ("x1", "y1", "x2", "y2"))
        anns.append({"id": next_id, "image_id": coco_id[file_of[row["image_id"]]],
                     "category_id": cat_of[row["class_id"]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
        next_id += 1
    coco["annotations"] = anns
    if only is not None:
        kept = {coco_id[file_of[i]] for i in only}
        coco["images"] = [im for im in coco["images"] if im["id"] in kept]
        coco["annotations"] = [a for a in anns if a["image_id"] in kept]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco))
    return out


def _labeled_ids(run: Any) -> list[str]:
    """The run's labeled pool images, as GLC sees them (``labeled_set``: val and test images
    are labeled too, and their files share names with pool files, which ``write_pool_with``
    matches by)."""
    from detloop.orchestrator.evaluation.glc import labeled_set

    return list(labeled_set(run)[0]["image_id"].to_pylist())


def _files(run: Any, ids: list[str]) -> list[str]:
    """The sorted file names of the run's images ``ids``."""
    images = run.read_images()
    name = dict(zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True))
    return sorted(Path(name[i]).name for i in ids)


def glc_variant(args: argparse.Namespace) -> str:
    """The corrected teachers' experiment: §11.5's settings keep the original name, others
    get theirs (``ssl_blocks_glc_corrected_ms0.2_md-mistakes``)."""
    from detloop.orchestrator.evaluation.glc import DEFAULT_PARAMS, GLC_MIN_SCORE

    oof = f"_oof{args.glc_folds}" if args.glc_folds > 1 else ""
    if args.glc_min_score == GLC_MIN_SCORE and args.glc_params == DEFAULT_PARAMS:
        return "ssl_blocks_glc_corrected" + oof
    rules = "-".join(args.glc_params.rules())
    return f"ssl_blocks_glc_corrected_ms{args.glc_min_score:g}_{rules}{oof}"


def fold_names(args: argparse.Namespace) -> list[str]:
    """The experiments of the out-of-fold teachers (none with one fold)."""
    k = args.glc_folds
    return [f"ssl_blocks_glc_fold{f}of{k}" for f in range(k)] if k > 1 else []


def glc_predictions(
    bench: Bench, seed: int, plain: Any, images: Any, corrupted: Any, run_c: Any, cfg_c: Any
) -> Any:
    """The detections GLC judges the corrupted labels by: with one fold (§11.5) the corrupted
    teacher's on its own training images; with K folds each labeled image's from a teacher
    trained on the corrupted labels of the other folds only (out-of-fold, as confident
    learning does), which has not memorised that image's wrong boxes or learnt its missing
    objects as background. ``images``: the plain run's labeled images (``labeled_set``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from detloop.orchestrator.evaluation.glc import teacher_predictions

    floor = bench.args.glc_min_score
    if bench.args.glc_folds == 1:
        return teacher_predictions(run_c, cfg_c, 0, images, floor)[0]
    ids = images["image_id"].to_pylist()
    fold_of = np.random.default_rng([seed, 1105]).permutation(len(ids)) % bench.args.glc_folds
    folder = Path(bench.args.runs_root) / "glc_pools" / f"s{seed}"
    sets = ["ssl.teacher_only=true", "ssl.teacher_strategy=", "ssl.portion_labeled=100"]
    parts = []
    for f, name in enumerate(fold_names(bench.args)):
        train = [i for i, k in zip(ids, fold_of, strict=True) if k != f]
        held = pa.array([i for i, k in zip(ids, fold_of, strict=True) if k == f])
        pool = write_pool_with(bench.data, plain, corrupted, folder / f"{name}.json", train)
        run_f = bench.run(name, seed, sets, pool=pool)
        assert _files(run_f, _labeled_ids(run_f)) == _files(plain, train)  # ids are per run
        held_images = images.filter(pc.is_in(images["image_id"], value_set=held))
        cfg_f = bench.config(name, seed, sets, pool=pool)
        parts.append(teacher_predictions(run_f, cfg_f, 0, held_images, floor)[0])
    return pa.concat_tables(parts)


def part_glc(bench: Bench, seed: int, clean: dict[str, float]) -> dict[str, Any]:
    """Corrupt the labeled boxes, train a teacher on them, let it correct its own training
    labels with GLC, retrain on the corrected set (module docstring)."""
    from detloop.orchestrator.evaluation.glc import labeled_set
    from detloop.selectors.ssl_glc import glc_correct
    from detloop.selectors.ssl_glc_stress import corrupt_labels, glc_recovery

    sets = ["ssl.teacher_only=true", "ssl.teacher_strategy="]
    plain = bench.run(NAME, seed, sets)  # the clean teacher (the teachers part's): its split
    images, labels = labeled_set(plain)
    corrupted, changes = corrupt_labels(labels, images, seed)
    folder = Path(bench.args.runs_root) / "glc_pools" / f"s{seed}"
    pool_c = write_pool_with(bench.data, plain, corrupted, folder / "corrupted.json")
    run_c = bench.run("ssl_blocks_glc_corrupted", seed, sets, pool=pool_c)
    assert sorted(_labeled_ids(run_c)) == sorted(_labeled_ids(plain))  # the same split
    cfg = bench.config("ssl_blocks_glc_corrupted", seed, sets, pool=pool_c)
    preds = glc_predictions(bench, seed, plain, images, corrupted, run_c, cfg)
    result = glc_correct(corrupted, preds, bench.args.glc_params)
    recovery = glc_recovery(result, changes)
    variant = glc_variant(bench.args)
    pool_file = folder / f"{variant.replace('ssl_blocks_glc_', '')}.json"
    pool_g = write_pool_with(bench.data, plain, result.labels, pool_file)
    run_g = bench.run(variant, seed, sets, pool=pool_g)
    m_c, m_g = _metrics(run_c, 0)["test_map"], _metrics(run_g, 0)["test_map"]
    lost = clean["map"] - m_c
    return {
        "clean": {"map": clean["map"]},
        "corrupted": {"map": float(m_c), "n_boxes": float(corrupted.num_rows)},
        "corrected": {
            "map": float(m_g),
            "n_boxes": float(result.labels.num_rows),
            "recovered_share": float((m_g - m_c) / lost) if lost > 0 else float("nan"),
            **{k: float(v) for k, v in recovery.items()},
            **{f"n_{k}": float(v) for k, v in result.counts().items()},
        },
    }


def part_pls(bench: Bench, seed: int) -> dict[str, Any]:
    """The oracle analysis of the plain student's pseudo-labels (AUC of S, C, D against "the
    image has a missed object", and the higher missing-rate levels), and the students on
    the top / random / bottom share of the images by D."""
    from detloop.orchestrator.loops.pls_analysis import pls_analysis

    sets = ["ssl.selection_strategy=score"]
    plain = bench.run("ssl_blocks", seed, sets)
    cfg = bench.config("ssl_blocks", seed, sets)
    tag = "bench"
    if (plain.pls_root / tag / "report.json").exists():
        report = json.loads((plain.pls_root / tag / "report.json").read_text())
    else:
        report = pls_analysis(plain, cfg, 1, tag=tag).report
    out: dict[str, Any] = {"plain": _student_record(plain)}
    auc: dict[str, float] = {}
    for signal, by_level in report["auc"].items():
        for level, value in by_level.items():
            auc[f"auc_{signal}_{level}"] = float("nan") if value is None else float(value)
    out["analysis"] = auc
    for variant in PLS:
        out[variant] = _student_record(bench.run("ssl_blocks", seed, [*sets, f"ssl.pls={variant}"]))
    return out


def part_3d(bench: Bench, seed: int) -> dict[str, Any]:
    sets = ["ssl.selection_strategy=score"]
    out = {"plain": _student_record(bench.run("ssl_blocks", seed, sets))}
    for variant in VARIANTS:
        run = bench.run("ssl_blocks", seed, [*sets, f"ssl.oracle_variant={variant}"])
        out[variant] = _student_record(run)
    return out


def part_csd(bench: Bench, seed: int) -> dict[str, Any]:
    run = bench.run("ssl_blocks", seed, ["ssl.method=csd"])
    teacher = _metrics(run, 0)
    return {
        "supervised": {"map": float(teacher["test_map"]), "map50": float(teacher["test_map50"])},
        "csd": {k: v for k, v in _student_record(run).items() if k in ("map", "map50")},
    }


COLUMNS = {
    "teachers": ["map", "map50", "rare_ap"],
    "glc": ["map", "recovered_share", "md_precision", "md_recall", "mistakes_precision",
            "mistakes_recall", "noisy_precision", "noisy_recall"],
    "pls": ["map", "auc_D_0", "auc_S_0", "auc_C_0", "precision", "recall", "pseudo_labels"],
    "3d": ["map", "map50", "pseudo_labels", "precision", "recall"],
    "csd": ["map", "map50"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--steps", type=int, default=500, help="training steps of every model")
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "bench_ssl_blocks")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=2, help="seeds run side by side")
    parser.add_argument(
        "--balanced-test",
        action="store_true",
        help="the test split's classes uniform (long-tailed pool and val): rare-class AP",
    )
    parser.add_argument("--tag", default="", help="results as ssl_blocks_<tag>.json")
    parser.add_argument(
        "--glc-min-score", type=float, default=0.1, help="GLC teacher's score floor (§11.5: 0.1)"
    )
    parser.add_argument(
        "--glc-rules", default="md,mistakes,noisy", help="GLC rules applied (default all)"
    )
    parser.add_argument(
        "--glc-folds",
        type=int,
        default=1,
        help="K > 1: out-of-fold GLC, each image judged by a teacher trained on the other "
        "K - 1 folds' corrupted labels (K more trainings a seed); 1: §11.5's own teacher",
    )
    args = parser.parse_args()
    if args.glc_folds < 1:
        raise SystemExit(f"--glc-folds must be >= 1, got {args.glc_folds}")
    from detloop.orchestrator.evaluation.glc import DEFAULT_PARAMS

    try:
        args.glc_params = DEFAULT_PARAMS.only(args.glc_rules)
    except ValueError as exc:
        raise SystemExit(f"--glc-rules: {exc}") from None
    local_env()
    data = digits_data(0.5, balanced_test=args.balanced_test)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    rare = rarest_classes(data)
    print(f"rarest classes (pool boxes): {rare}", flush=True)
    _prepare_tracking(Bench(args, data))
    t0 = time.perf_counter()
    records: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in parts}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(seed_records, args, data, parts, rare, s): s for s in seeds}
        for future in as_completed(futures):
            for part, record in future.result().items():
                records[part][futures[future]] = record
            _save(args, seeds, parts, rare, records, time.perf_counter() - t0)
    _save(args, seeds, parts, rare, records, time.perf_counter() - t0, final=True)


def _prepare_tracking(bench: Bench) -> None:
    """The MLflow store and the bench's experiments, created once before the seed processes
    open them (SQLite schema creation is not safe to race)."""
    from detloop.orchestrator.engine.tracking import prepare_store

    for name in (*NAMES, glc_variant(bench.args), *fold_names(bench.args)):
        prepare_store(bench.config(name, 0, []))


def seed_records(
    args: argparse.Namespace, data: Path, parts: list[str], rare: list[str], seed: int
) -> dict[str, Any]:
    """Every part of one seed (in its own process: one torch thread each)."""
    import torch

    torch.set_num_threads(1)
    local_env()
    bench = Bench(args, data)
    out: dict[str, Any] = {}
    plain = ["ssl.teacher_only=true", "ssl.teacher_strategy="]
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("teachers", lambda: part_teachers(bench, seed, rare)),
        ("glc", lambda: part_glc(bench, seed, _teacher_record(bench.run(NAME, seed, plain), rare))),
        ("csd", lambda: part_csd(bench, seed)),
        ("pls", lambda: part_pls(bench, seed)),
        ("3d", lambda: part_3d(bench, seed)),
    ]
    for part, fn in steps:
        if part not in parts:
            continue
        try:
            out[part] = fn()
        except Exception:  # one broken part must not lose the seed's other figures
            traceback.print_exc()
            out[part] = {"failed": {"error": 1.0}}
    return out


def _save(
    args: argparse.Namespace,
    seeds: list[int],
    parts: list[str],
    rare: list[str],
    records: dict[str, dict[int, dict[str, Any]]],
    wall: float,
    final: bool = False,
) -> None:
    """Summary, table, JSON and plot of what is done so far (after every seed)."""
    summary = summarise(records)
    if final:
        print(table(summary, COLUMNS))
        print(f"wall time: {wall / 60:.1f} min for {len(seeds)} seeds x parts {','.join(parts)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"ssl_blocks_{args.tag}" if args.tag else "ssl_blocks"
    plot(summary, RESULTS / f"{name}.png", args.balanced_test)
    doc = {
        "seeds": seeds,
        "parts": parts,
        "steps": args.steps,
        "balanced_test": args.balanced_test,
        "rarest_classes": rare,
        "overrides": args.overrides,
        "wall_s": wall,
        "summary": summary,
        "records": records,
    }
    path = write_result(name, doc)
    if final:
        print(f"wrote {path} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
