"""Label efficiency: the labels each AL strategy needs to reach 90 % and 95 % of the full-data
model's mAP, and whether it beats `random` beyond seed-to-seed noise.

On digits-det small with class imbalance (r = 0.7), every model starting from the pretrained
digits backbone (``configs/demo.yaml``) and trained to a plateau (early stopping on val mAP,
best weights kept, an epoch and step cap as a backstop; each training's steps and whether the
cap stopped it are recorded):

- the full-data model (the whole pool labeled) gives the 100 % line;
- per variant and seed, an AL curve (test mAP@[.5:.95] against labeled images) at the setting's
  budgets; the variants of one seed run concurrently and share iteration 0 (the warm-up cache);
- per variant: the area under the curve (over the labeled share, normalised) with a paired
  bootstrap interval and Wilcoxon p-value against `random` over seeds, the labels needed to reach
  90 % / 95 % of full-data mAP (linear interpolation on the mean curve and per seed) and their
  ratio to random's; a table, ``bench/results/label_efficiency.json`` and one plot with mean ± std
  bands.

A variant is an AL strategy name with optional suffixes: ``+ssl`` trains each iteration's model
as an SSL student on the labeled set plus pseudo-labels (``al.ssl``), ``+scratch`` starts from
random init instead of the pretrained backbone (``model.weights=null``):

    python bench/label_efficiency.py [--setting small|default|medium|large]
        [--strategies random,entropy,alluncert,calib_alluncert,random+scratch]
        [--seeds 0,1,2,3,4] [--parallel 3] [--full-steps 12000] [--set train.max_steps=800]

``--replot`` rebuilds the table, JSON and plot from the finished runs (no training), e.g. with
another full-data model (``--full-steps``) as the 100 % line once it has trained.

Settings (2 cores; ``small`` measured, the others scaled from measured throughput):

    small    3 seeds, 5 / 10 / 25 % labeled, at most 400 steps per model (full data 1,500):
             90 min measured. NOT a plateau: every pretrained training hit its cap, and the
             curves are flat (bench/results/label_efficiency_small.json).
    default  the same with 5 seeds, about 2.5 h: the most a 2-core machine fits near two hours,
             and as capped, so its curves measure the step budget more than the labels.
    medium   5 seeds, 5 / 10 / 25 % labeled, each AL iteration going on from the previous
             iteration's model (``al.warm_start``) for a full 1,500-step cosine schedule (the
             full-data model 5,000), val every 250 steps and the best val weights kept (a
             patience above the evaluations: a cosine run's gain comes as its rate anneals):
             3.75x the small setting's steps per model, 4.5x a curve's cumulative steps at
             25 %. Measured with four strategies: seeds 0-2 2.1 h on 2 cores (seed 0 with the
             full-data model 67 min, then seeds 1 and 2 side by side with ``--parallel 13``
             58 min), seeds 3 and 4 side by side with a 12,000-step full-data model 2.3 h
             (``--parallel 21 --full-steps 12000``, beside another bench). Its full-data model
             is not a ceiling: at 5,000 steps (20 epochs) it stays below the 500-image AL
             models, which add up 4,500 warm-started steps (label_efficiency_medium.json); at
             12,000 steps it reaches 0.676 and is still capped (..._full12k.json).
    large    the plateau setting: 5 seeds, 5 / 10 / 25 % labeled, every model trained until
             val mAP stops rising under ``train.lr_schedule: plateau`` (val every 500 steps,
             patience 3, two ×0.1 drops of the rate), each AL iteration starting from the
             previous iteration's model (``al.warm_start``); step caps 15,000 (full data
             30,000) as a backstop. Sized from the SSL bench's teachers on the same data
             (200 labeled images, pretrained backbone: val mAP 0.37–0.43 after 2,000 steps,
             best 0.54–0.58 after 7,500–13,500; bench/results/ssl_plateau.json): about
             300,000 training steps, 7–8 h on 2 cores at ~13 steps/s, three loops side by side
             (estimated, not run) — a GPU machine's work.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from benchkit import REPO, RESULTS, local_env, write_result


@dataclass(frozen=True)
class Setting:
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]  # al.al_budgets: iteration 0's share, then each query's
    max_steps: int
    full_max_steps: int  # the full-data model sees the whole pool
    epochs: int = 60
    map_freq: int = 3  # epochs between val checks (train.early_stopping_metric: mAP)
    patience: int = 2  # checks without improvement before stopping (or a drop of the rate)
    eval_steps: int | None = None  # val checks every this many steps instead of map_freq
    lr_schedule: Literal["cosine", "plateau"] = "cosine"  # train.lr_schedule
    warm_start: bool = False  # each AL iteration starts from the previous one's model


SETTINGS = {
    "small": Setting((0, 1, 2), (5, 5, 15), max_steps=400, full_max_steps=1500),
    "default": Setting((0, 1, 2, 3, 4), (5, 5, 15), max_steps=400, full_max_steps=1500),
    "medium": Setting(
        (0, 1, 2, 3, 4),
        (5, 5, 15),
        max_steps=1500,
        full_max_steps=5000,
        epochs=1000,
        patience=100,
        eval_steps=250,
        warm_start=True,
    ),
    "large": Setting(
        (0, 1, 2, 3, 4),
        (5, 5, 15),
        max_steps=15000,
        full_max_steps=30000,
        epochs=1000,
        patience=3,
        eval_steps=500,
        lr_schedule="plateau",
        warm_start=True,
    ),
}
REFERENCE = "random"
PERCENTS = (90.0, 95.0)
SUFFIXES = {"ssl": ["al.ssl=true"], "scratch": ["model.weights=null"]}


def _data() -> Path:
    from detloop.data.digits import make_digits

    data = REPO / "data" / "digits-small-imb07"
    if not (data / "test.json").exists():
        make_digits(data, "small", seed=0, imbalance=0.7)
    return data


def parse_variant(variant: str) -> tuple[str, list[str], str]:
    """``entropy+ssl+scratch`` -> (strategy, its --set overrides, experiment name)."""
    strategy, *suffixes = variant.split("+")
    unknown = [s for s in suffixes if s not in SUFFIXES]
    if unknown or not strategy:
        raise SystemExit(f"variant {variant!r}: suffixes are {', '.join(SUFFIXES)}")
    sets = [f"al.strategy={strategy}", *(v for s in suffixes for v in SUFFIXES[s])]
    # runs of the same strategy name with and without a suffix must not share a run directory
    name = "label_efficiency" + "".join(f"_{s}" for s in sorted(suffixes) if s != "ssl")
    return strategy, sets, name


def _overrides(args: argparse.Namespace, setting: Setting, data: Path, seed: int) -> list[str]:
    return [
        f"runs_root={args.runs_root}",
        f"seed={seed}",
        f"al.al_budgets=[{','.join(str(b) for b in setting.budgets)}]",
        "train.early_stopping=true",
        f"train.epochs={setting.epochs}",
        f"train.max_steps={setting.max_steps}",
        f"train.map_freq={setting.map_freq}",
        f"train.patience={setting.patience}",
        f"train.eval_steps={setting.eval_steps if setting.eval_steps else 'null'}",
        f"train.lr_schedule={setting.lr_schedule}",
        f"al.warm_start={str(setting.warm_start).lower()}",
        "train.torch_threads=1",  # loops run side by side: one thread each, no oversubscription
        "ray.train_num_cpus=1",
        "ray.predict_workers=1",
        "ray.predict_num_cpus=1",
        *(f"data.{s}.source={data / (s + '.json')}" for s in ("pool", "val", "test")),
        *(f"data.{s}.images={data / 'images' / s}" for s in ("pool", "val", "test")),
        *args.overrides,
    ]


def build_configs(args: argparse.Namespace, setting: Setting, data: Path) -> list[Any]:
    """(label, config) of the full-data model and of every variant x seed, in run order."""
    from detloop.config import load_config

    base = REPO / "configs" / "demo.yaml"
    jobs: list[Any] = []
    for seed in args.seeds:
        if seed in args.full_seeds:
            steps = args.full_steps or setting.full_max_steps
            # a non-default cap is another model: its own run directory, the cached one kept
            suffix = f"_s{steps}" if steps != setting.full_max_steps else ""
            full = [
                *_overrides(args, setting, data, seed),
                f"name=label_efficiency_full{suffix}",
                "al.strategy=random",
                "al.al_budgets=[100]",
                f"train.max_steps={steps}",
                "train.map_freq=1",
            ]
            jobs.append(("full", seed, load_config(base, full)))
        for variant in args.strategies:
            _strategy, sets, name = parse_variant(variant)
            cfg = load_config(base, [*_overrides(args, setting, data, seed), f"name={name}", *sets])
            jobs.append((variant, seed, cfg))
    return jobs


def _run_all(jobs: list[Any], parallel: int | None) -> dict[tuple[str, int], Any]:
    """Run the loops in chunks — by default one chunk per seed (its variants share its warm-up;
    the full-data model joins the first), else ``parallel`` at a time in order; the run
    directory and step cap of each (label, seed)."""
    from detloop.demo import ensure_pretrained
    from detloop.orchestrator.loops.grid import run_configs

    ensure_pretrained([c for _, _, c in jobs], REPO / "data" / "pretrained-digits-tiny")
    if parallel:
        chunks = [jobs[i : i + parallel] for i in range(0, len(jobs), parallel)]
    else:
        seeds = list(dict.fromkeys(seed for _, seed, _ in jobs))
        chunks = [[j for j in jobs if j[1] == seed] for seed in seeds]
    runs: dict[tuple[str, int], Any] = {}
    for chunk in chunks:
        print("== " + ", ".join(f"{label} seed {seed}" for label, seed, _ in chunk), flush=True)
        t0 = time.perf_counter()
        outcomes = run_configs([c for _, _, c in chunk])
        for (label, seed, cfg), outcome in zip(chunk, outcomes, strict=True):
            if outcome.status != "done":
                raise SystemExit(f"{label} seed {seed}: loop {outcome.status}: {outcome.run.path}")
            runs[(label, seed)] = (outcome.run, cfg.train.max_steps)
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    return runs


def _stored_runs(jobs: list[Any], budgets: int) -> dict[tuple[str, int], Any]:
    """``--replot``: the finished run of every job, trained by an earlier invocation; a run
    that is missing or has not logged all its iterations stops the bench, naming it."""
    from detloop.orchestrator.engine.runs import run_dir_for

    runs: dict[tuple[str, int], Any] = {}
    for label, seed, cfg in jobs:
        run = run_dir_for(cfg)
        want = 1 if label == "full" else budgets
        got = len(run_points(run, cfg.train.max_steps)) if run.path.exists() else 0
        if got < want:
            raise SystemExit(f"--replot: {label} seed {seed}: {run.path} has {got} of {want} "
                             "iterations logged; run without --replot to train it")  # fmt: skip
        runs[(label, seed)] = (run, cfg.train.max_steps)
    return runs


def run_points(run: Any, max_steps: int) -> list[dict[str, float]]:
    """Per logged iteration: labeled images and share, test (and val) mAP, training steps and
    whether the step cap (not early stopping) ended the training (NaN for a warm-up copied
    from the cache)."""
    from detloop.data.io import read_json
    from detloop.reports.al_curves import run_curve

    points = []
    for p in run_curve(run):
        m = read_json(run.metrics_file(p.iteration))
        steps = float(m.get("train_steps", float("nan")))
        points.append(
            {
                "labeled": float(p.labeled_images),
                "fraction": p.labeled_fraction,
                "map": float(m.get("test_map", float("nan"))),
                "map50": float(m.get("test_map50", float("nan"))),
                "val_map": p.map,
                "train_steps": steps,
                "capped": float(steps >= max_steps) if steps == steps else float("nan"),
            }
        )
    return points


def points_auc(points: list[dict[str, float]]) -> float:
    from detloop.reports.al_curves import curve_auc

    return curve_auc(
        np.array([p["fraction"] for p in points]), np.array([p["map"] for p in points])
    )


def summarise(
    curves: dict[str, dict[int, list[dict[str, float]]]], full_map: float
) -> dict[str, Any]:
    """Per variant: mean ± std curve, AUC and its paired comparison with random, labels to
    reach 90 / 95 % of ``full_map`` (mean curve and per seed) and their ratio to random's."""
    from detloop.selectors.label_efficiency import labels_to_reach, paired_comparison

    out: dict[str, Any] = {}
    ref_seeds = set(curves.get(REFERENCE, {}))
    ref_labels: dict[float, float | None] = {}
    for variant in sorted(curves, key=lambda v: (v != REFERENCE, v)):
        by_seed = curves[variant]
        seeds = sorted(by_seed)
        n = min(len(c) for c in by_seed.values())
        labels = np.array([[p["labeled"] for p in by_seed[s][:n]] for s in seeds]).mean(axis=0)
        maps = np.array([[p["map"] for p in by_seed[s][:n]] for s in seeds])
        aucs = {s: points_auc(by_seed[s][:n]) for s in seeds}
        entry: dict[str, Any] = {
            "seeds": seeds,
            "labels": labels.tolist(),
            "map_mean": maps.mean(axis=0).tolist(),
            "map_std": (maps.std(axis=0, ddof=1) if len(seeds) > 1 else 0 * maps[0]).tolist(),
            "auc": {"mean": float(np.mean(list(aucs.values()))), "per_seed": aucs},
            "capped_trainings": int(sum(p["capped"] == 1 for s in seeds for p in by_seed[s])),
            "trainings": int(sum(p["capped"] == p["capped"] for s in seeds for p in by_seed[s])),
        }
        for pct in PERCENTS:
            mean_curve = labels_to_reach(labels, maps.mean(axis=0), pct, full_map)
            per_seed = {
                s: labels_to_reach(labels, maps[i], pct, full_map) for i, s in enumerate(seeds)
            }
            if variant == REFERENCE:
                ref_labels[pct] = mean_curve
            ref = ref_labels.get(pct)
            entry[f"labels_to_{pct:.0f}"] = {
                "mean_curve": mean_curve,
                "per_seed": per_seed,
                "vs_random": (mean_curve / ref) if mean_curve is not None and ref else None,
            }
        paired = sorted(ref_seeds & set(seeds))
        if variant != REFERENCE and len(paired) >= 2:
            ref_aucs = {s: points_auc(curves[REFERENCE][s][:n]) for s in paired}
            cmp = paired_comparison([aucs[s] for s in paired], [ref_aucs[s] for s in paired])
            entry["auc_vs_random"] = {
                "n": cmp.n,
                "mean_diff": cmp.mean_diff,
                "ci": [cmp.ci_low, cmp.ci_high],
                "confidence": cmp.confidence,
                "p_value": cmp.p_value,
                "beats_random": cmp.ci_low > 0,
            }
        out[variant] = entry
    return out


def table(summary: dict[str, Any], full_map: float) -> str:
    def labels(d: dict[str, Any]) -> str:
        v, r = d["mean_curve"], d["vs_random"]
        return "never" if v is None else f"{v:.0f}" + (f" ({r:.2f}x)" if r is not None else "")

    any_entry = next(iter(summary.values()))
    head = " ".join(f"{x:>7.0f}" for x in any_entry["labels"])
    lines = [
        f"full-data test mAP {full_map:.4f}; labeled images per point: {head}",
        f"{'variant':<22} {'test mAP per point (mean ± std)':<44} {'AUC':>7} "
        f"{'AUC - random [95% CI] p':>32} {'to 90%':>14} {'to 95%':>14}",
    ]
    for variant, e in summary.items():
        cells = " ".join(
            f"{m:.3f}±{s:.3f}" for m, s in zip(e["map_mean"], e["map_std"], strict=True)
        )
        cmp = e.get("auc_vs_random")
        vs = "-"
        if cmp:
            low, high = cmp["ci"]
            vs = f"{cmp['mean_diff']:+.4f} [{low:+.4f}, {high:+.4f}] {cmp['p_value']:.2f}"
        lines.append(
            f"{variant:<22} {cells:<44} {e['auc']['mean']:>7.4f} {vs:>32} "
            f"{labels(e['labels_to_90']):>14} {labels(e['labels_to_95']):>14}"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], full_map: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, e in summary.items():
        x, m, s = (np.array(e[k]) for k in ("labels", "map_mean", "map_std"))
        ax.plot(x, m, marker="o", label=f"{variant} (n={len(e['seeds'])})")
        ax.fill_between(x, m - s, m + s, alpha=0.15)
    for pct, style in ((100, "-"), (95, "--"), (90, ":")):
        ax.axhline(full_map * pct / 100, color="black", lw=0.8, ls=style, label=f"{pct}% full data")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test mAP@[.5:.95]")
    ax.set_title("Label efficiency on digits-det small (r = 0.7), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--strategies", default="random,entropy,alluncert,calib_alluncert")
    parser.add_argument("--seeds", default=None, help="default: the setting's")
    parser.add_argument("--full-seeds", default=None, help="full-data models (default: 1st seed)")
    parser.add_argument(
        "--full-steps", type=int, default=None, help="full-data step cap (default: the setting's)"
    )
    parser.add_argument(
        "--parallel", type=int, default=None, help="loops at once (default: a seed's variants)"
    )
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "bench_label_efficiency")
    parser.add_argument("--out", default="label_efficiency", help="bench/results/<out>.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--replot",
        action="store_true",
        help="table, JSON and plot from the finished runs of an earlier invocation (no training;"
        " wall_s null)",
    )
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    args.seeds = [int(s) for s in split(args.seeds)] if args.seeds else list(setting.seeds)
    args.full_seeds = (
        [int(s) for s in split(args.full_seeds)] if args.full_seeds else args.seeds[:1]
    )
    args.strategies = split(args.strategies)
    for v in args.strategies:
        parse_variant(v)
    if REFERENCE not in args.strategies:
        raise SystemExit(f"--strategies must include {REFERENCE!r}, the reference")
    local_env()
    data = _data()
    jobs = build_configs(args, setting, data)
    t0 = time.perf_counter()
    if args.replot:
        runs = _stored_runs(jobs, len(setting.budgets))
    else:
        runs = _run_all(jobs, args.parallel)
    wall = None if args.replot else time.perf_counter() - t0
    curves: dict[str, dict[int, list[dict[str, float]]]] = {}
    full: dict[int, list[dict[str, float]]] = {}
    for (label, seed), (run, max_steps) in runs.items():
        points = run_points(run, max_steps)
        (full if label == "full" else curves.setdefault(label, {}))[seed] = points
    full_map = float(np.mean([pts[-1]["map"] for pts in full.values()]))
    summary = summarise(curves, full_map)
    print(table(summary, full_map))
    trainings = sum(e["trainings"] for e in summary.values()) + len(full)
    took = "replotted from stored runs" if wall is None else f"wall time: {wall / 60:.1f} min"
    print(f"{took} ({args.setting}: {len(args.seeds)} seeds x "
          f"{len(args.strategies)} variants, {trainings} trainings)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{args.out}.png"
    plot(summary, full_map, png)
    path = write_result(
        args.out,
        {
            "dataset": "digits-det small, imbalance r=0.7 (pool 2000, val 300, test 300)",
            "setting": args.setting,
            "settings": {k: v.__dict__ for k, v in SETTINGS.items()},
            "seeds": args.seeds,
            "strategies": args.strategies,
            "overrides": args.overrides,
            "full_data": {"map": full_map, "runs": {s: p for s, p in full.items()}},
            "summary": summary,
            "curves": curves,
            "wall_s": wall,
        },
    )
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
