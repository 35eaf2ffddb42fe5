"""Semi-supervised learning on digits-det small with class imbalance (r = 0.7), 10 % labeled.

(Named ssl_bench.py, not ssl.py: a script's folder comes first on sys.path, and a bench/ssl.py
would shadow the standard library's ssl module that pyarrow and MLflow import.)

For each seed: the supervised teacher (round 0, trained for ``--teacher-steps``; shared by every
variant of the seed through the teacher cache) and one student per variant, each trained for
``--student-steps`` from the teacher's weights (``ssl.student_init: teacher``; ``--student-init
initial`` starts it from the pretrained backbone instead, as the reference did) —

    restart    the control: no pseudo-label passes τ = 1, so the "student" is the teacher
               trained the students' budget more on the labeled part (a schedule restart):
               what extra training alone gives, to be told apart from what SSL gives
    stac       STAC: pseudo-labels with teacher score > τ = 0.4 (§11.1)
    alluncert  uncertainty selection: certainty of (rel. MC std, rel. aleatoric std, MC class)
    +ignore    (stac+ignore, alluncert+ignore) the teacher's detections the selection rejected
               are ignore regions of the student's class loss, not background (ssl.rejected)
    +L4        4 labeled + 4 pseudo-labeled images a step (ssl.labeled_per_batch) instead of
               §11.1's 1 + 7 at 10 % labeled
    +weakaug   pseudo-labeled images without STAC's strong RandAugment (flip and scale only)
    +nobox     class-only pseudo-labels: no box regression on them (ssl.pseudo_box_weight 0)
    +lam0.5, +mag5, +tau0.7   λ, the RandAugment magnitude, τ off their defaults
    +p0.9      τ fitted on the teacher's validation predictions for pseudo-label precision
               0.9 (ssl.target_precision): strategies compared at equal precision
    +pciou0.75 pcorrect fitted on right = matched at IoU ≥ 0.75 (ssl.pcorrect_iou)
    +pcioucoco pcorrect fitted on the fraction of IoU 0.5:0.95 at which it matches
    +fixmd, +nofd   the 3D study's oracles (§11.8, the hidden gt; bounds, not methods): the
               pseudo-labels' misses filled in from gt / their false detections removed
    ental      uncertainty selection: entropy + aleatoric certainty, weighted
    combo      cost-sensitive selection: u = w·(entropy, rel. al) < δ̄ of §7 on calibrated columns
    pcorrect   P(right) of a logistic regression on score and uncertainties, fitted on the
               teacher's validation detections (selectors.pseudo_correctness)
    selftrain  STAC then self-training rounds (re-predict with the student, retrain from it)
    ema        an online mean teacher labeling each step (burn-in = the teacher)

— with test mAP@[.5:.95] and mAP50 of every model and the precision/recall of its pseudo-labels
at IoU 0.5 against the hidden ground truth. Prints a table (mean ± std over seeds, relative gain
over the teacher and over the restart control), writes bench/results/ssl.json and
bench/results/ssl.png, and the wall time. Seeds run side by side (``--jobs``, one torch thread
each); runs resume, so an interrupted bench picks up where it stopped.

    python bench/ssl_bench.py [--seeds 0,1,2] [--variants restart,stac,alluncert,selftrain,ema]
        [--teacher-steps 5000] [--student-steps 500] [--student-init teacher] [--jobs 3]
        [--runs-root DIR [--teachers-from DIR]] [--tag T] [--set ssl.tau=0.5]

Budgets: the teacher's 5,000 steps are §11.1's 200 epochs of 200 images (seed 0's test mAP
after 1,000 / 2,000 / 5,000 steps, each its own cosine schedule: 0.19 / 0.34 / 0.42). Students
of 500 steps are the quick setting (results: ssl.json); 3,000 steps (``--student-steps 3000
--runs-root runs/bench_ssl_s3000 --teachers-from runs/bench_ssl --tag s3000``) the one where
the pseudo-labels' data can show (ssl_s3000.json; the calibrated `combo`, the rankings and the
comparison at equal pseudo-label precision, ``--variants stac+weakaug+p0.9,pcorrect+weakaug+p0.9,
combo+weakaug --seeds 0,1,2,3,4 --tag s3000_p09``: ssl_s3000_p09.json, its _rankings.png).
Longer-trained teachers (ssl_t10k.json): ``--teacher-steps 10000 --runs-root
runs/bench_ssl_t10k --tag t10k --set train.epochs=1000 --set train.early_stopping=true --set
train.patience=6 --set train.early_stopping_metric=map50`` (the teacher stops when val mAP50
stops rising, 7,000-8,000 steps; ``map``, now the default, watches mAP@[.5:.95]); the JSON's
``plateaus`` say where each training's val curve peaked. A runs root holds one budget.
Teachers trained to a plateau (ssl_plateau.json; ``selftrain+weakaug`` with ``--tag
plateau_b`` on the same root: ssl_plateau_b.json): ``--teacher-steps 15000 --student-steps
3000 --runs-root runs/bench_ssl_plateau --tag plateau --variants restart,stac+weakaug,
pcorrect+weakaug+p0.9,stac+weakaug+p0.9 --set train.epochs=1000 --set
train.early_stopping=true --set train.patience=3 --set train.lr_schedule=plateau --set
ssl.student_lr_schedule=cosine --set ssl.student_eval_steps=500``. Longer students on those
teachers: the same with ``--student-steps 6000 --runs-root runs/bench_ssl_plateau_s6000
--teachers-from runs/bench_ssl_plateau --tag plateau_s6000 --variants
stac+weakaug+p0.9,pcorrect+weakaug+p0.9,restart`` (students stop on val patience 3), and over
their whole schedule with ``--set ssl.student_patience=100 --runs-root
runs/bench_ssl_plateau_s6000_nostop --tag plateau_s6000_nostop --variants
stac+weakaug+p0.9,restart``. A self-training round as long as the student on the same teachers
(ssl_plateau_st3000.json): ``--variants selftrain+weakaug+p0.9 --student-steps 3000
--selftrain-steps 3000 --runs-root runs/bench_ssl_plateau_st3000 --teachers-from
runs/bench_ssl_plateau_s6000 --tag plateau_st3000`` with the plateau ``--set`` items above and
``--set ssl.student_patience=100``. Each JSON's ``classes`` holds the per-class view
(pseudo-labels, their precision, test AP per class).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchkit import (
    REPO,
    RESULTS,
    data_sets,
    digits_data,
    local_env,
    run_loop,
    seed_stats,
    ssl_pseudo_classes,
    ssl_round_figures,
    val_curves,
    write_result,
)
from ssl_classes import class_table, class_table_text

#: a variant is ``<base>[+<modifier>...]``: the base's --set items, then each modifier's
BASES: dict[str, list[str]] = {
    "restart": ["ssl.selection_strategy=score", "ssl.tau=1"],
    "stac": ["ssl.selection_strategy=score"],
    "alluncert": ["ssl.selection_strategy=pseudoscore_alluncert"],
    "ental": ["ssl.selection_strategy=pseudoscore_ental"],
    "combo": ["ssl.selection_strategy=calib_combo"],
    "pcorrect": ["ssl.selection_strategy=pcorrect"],
    "selftrain": ["ssl.selection_strategy=selftrain_score"],
    "ema": ["ssl.selection_strategy=score", "ssl.teacher=ema"],
}
MODIFIERS: dict[str, list[str]] = {
    "ignore": ["ssl.rejected=ignore"],
    "L4": ["ssl.labeled_per_batch=4"],
    "weakaug": ["ssl.stac_randaug=false"],
    "nobox": ["ssl.pseudo_box_weight=0"],
    "lam0.5": ["ssl.stac_lambda=0.5"],
    "mag5": ["ssl.randaug_magnitude=5"],
    "tau0.7": ["ssl.tau=0.7"],
    # τ fitted per run on the teacher's validation predictions for this pseudo-label
    # precision: every selection strategy at the same precision, told apart by what it keeps
    "p0.9": ["ssl.target_precision=0.9"],
    # pcorrect fitted on "right" = IoU >= 0.75 (well-localised pseudo-labels) instead of 0.5
    "pciou0.75": ["ssl.pcorrect_iou=0.75"],
    "pcioucoco": ["ssl.pcorrect_iou=coco"],
    # the 3D study's oracles (§11.8, the pool's hidden gt): what the pseudo-labels' misses and
    # false detections cost the student
    "fixmd": ["ssl.oracle_variant=fixmd"],
    "nofd": ["ssl.oracle_variant=nofd"],
}


def variant_sets(variant: str) -> list[str]:
    """The --set items of ``variant`` (``stac+weakaug+fixmd``: the base's, then each
    modifier's, in the name's order); ValueError naming what is unknown."""
    base, *mods = variant.split("+")
    unknown = [t for t in mods if t not in MODIFIERS]
    if base not in BASES or unknown:
        raise ValueError(
            f"unknown variant {variant!r}: a base of {', '.join(BASES)}, then +modifiers of "
            f"{', '.join(MODIFIERS)}"
        )
    return [*BASES[base], *(item for mod in mods for item in MODIFIERS[mod])]


NAME = "ssl_bench"


def _config(args: argparse.Namespace, data: Path, seed: int, sets: list[str]) -> Any:
    from detloop.config import load_config

    base = [
        f"name={NAME}",
        f"runs_root={args.runs_root}",
        f"seed={seed}",
        "ray.in_process=true",
        "train.torch_threads=1",
        "train.epochs=200",  # §11.1's epochs; the step caps below end every training
        f"train.max_steps={args.teacher_steps}",
        f"ssl.student_max_steps={args.student_steps}",
        f"ssl.student_init={args.student_init}",
        f"ssl.selftrain_rounds={args.selftrain_rounds}",
        *_selftrain_sets(args.selftrain_steps),
        *data_sets(data),
    ]
    return load_config(REPO / "configs" / "ssl_demo.yaml", [*base, *sets, *args.overrides])


def _selftrain_sets(steps: int | None) -> list[str]:
    """A self-training round of ``steps`` steps: the cap, and epochs that never end it first
    (an epoch is at least one step; the config's ``selftrain_epochs``, 2 ≈ 500 steps, would).
    None: the config's epochs decide."""
    if steps is None:
        return []
    return [f"ssl.selftrain_max_steps={steps}", f"ssl.selftrain_epochs={steps}"]


def _run_variant(variant: str, seed: int, args: argparse.Namespace, data: Path) -> Any:
    return run_loop(_config(args, data, seed, variant_sets(variant)), f"{variant} seed {seed}")


def seed_records(
    args: argparse.Namespace, data: Path, variants: list[str], seed: int
) -> dict[str, Any]:
    """Every variant of one seed (in its own process, one torch thread); the first trains
    the teacher, the others restore it from the teacher cache."""
    import torch

    from detloop.orchestrator.engine.tracking import tracking_uri

    torch.set_num_threads(1)
    local_env()
    uri = tracking_uri(_config(args, data, seed, []))
    out: dict[str, Any] = {}
    for variant in variants:
        try:
            out[variant] = _record(_run_variant(variant, seed, args, data), uri)
        except Exception:  # one broken variant must not lose the seed's other figures
            traceback.print_exc()
    return out


def _record(run: Any, uri: str) -> dict[str, Any]:
    """Per round: test mAP, mAP50 and the pseudo-labels' count, precision, recall; the run's
    directory, its phase time and its val mAP and mAP50 curves (``train.early_stopping``)."""
    path = Path(run.path).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else Path(path.name)
    # the run's own phase time (a teacher restored from the cache costs ~0): what a resumed,
    # already finished bench still reports, where its wall time would be ~0
    seconds = sum(float(h.get("seconds") or 0.0) for h in run.read_meta().get("history", []))
    return {
        "rounds": ssl_round_figures(run),
        "classes": ssl_pseudo_classes(run),
        "run": str(shown),
        "run_seconds": seconds,
        **val_curves(run, uri),
    }


def summarise(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over seeds of the teacher and of each variant's final model, with the
    relative mAP gain over the teacher (and over the restart control) of the same seed and
    the pseudo-labels' quality."""
    out: dict[str, Any] = {}
    teacher = {
        seed: rec["rounds"][0] for by_seed in records.values() for seed, rec in by_seed.items()
    }
    out["teacher"] = {m: seed_stats([t[m] for t in teacher.values()]) for m in ("map", "map50")}
    restart = {s: rec["rounds"][-1] for s, rec in records.get("restart", {}).items()}
    for variant, by_seed in records.items():
        finals = {seed: rec["rounds"][-1] for seed, rec in by_seed.items()}
        firsts = {seed: rec["rounds"][1] for seed, rec in by_seed.items()}
        gains = [100 * (finals[s]["map"] / teacher[s]["map"] - 1) for s in finals]
        over = [100 * (finals[s]["map"] / restart[s]["map"] - 1) for s in finals if s in restart]
        out[variant] = {
            "map": seed_stats([f["map"] for f in finals.values()]),
            "map50": seed_stats([f["map50"] for f in finals.values()]),
            "gain_pct": seed_stats(gains),
            "gain_vs_restart_pct": seed_stats(over),
            **{
                k: seed_stats([f.get(k, float("nan")) for f in firsts.values()])
                for k in ("pseudo_labels", "precision", "recall")
            },
        }
    return out


def rankings(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per selection signal, mean ± std over seeds of how it ranks the teacher's candidates
    (selectors.pseudo_ranking: AP against the hidden gt, precision and recall at the count
    STAC's τ = 0.4 keeps). The candidates are the teacher's, so each seed's figures come from
    the first variant that logged them (variants with another τ, whose count differs, and the
    restart control, which keeps none, left out; a fitted τ does not change STAC's count)."""
    per_seed: dict[int, dict[str, float]] = {}
    for variant, by_seed in records.items():
        if variant.split("+")[0] == "restart" or "+tau" in variant:
            continue
        for seed, rec in by_seed.items():
            first = rec["rounds"][1] if len(rec["rounds"]) > 1 else {}
            for key, value in first.items():
                if key.startswith("rank_"):
                    per_seed.setdefault(seed, {}).setdefault(key, value)
    signals = sorted(
        {k.removeprefix("rank_ap_") for f in per_seed.values() for k in f if "rank_ap_" in k}
    )
    out: dict[str, dict[str, Any]] = {}
    for signal in signals:
        out[signal] = {}
        for figure in ("ap", "precision_at_k", "recall_at_k"):
            key = f"rank_{figure}_{signal}"
            out[signal][figure] = seed_stats([f[key] for f in per_seed.values() if key in f])
    return out


def plateaus(
    records: dict[str, dict[int, dict[str, Any]]], metric: str = "val_map50"
) -> dict[str, dict[str, Any]]:
    """Per trained round (teacher, student, ...) and seed, where its val curve of ``metric``
    (``val_map50`` or ``val_map``) peaked and how much its second half added: the evidence
    for or against a plateau. Each seed's teacher curve is in the run that trained it."""
    out: dict[str, dict[str, Any]] = {}
    for variant, by_seed in records.items():
        for seed, rec in by_seed.items():
            for stage, curve in rec.get(metric, {}).items():
                if len(curve) < 2:
                    continue
                key = stage if stage == "teacher" else f"{variant} {stage}"
                epochs = [e for e, _ in curve]
                values = [v for _, v in curve]
                best = max(range(len(values)), key=values.__getitem__)
                half = max(values[: (len(values) + 1) // 2])
                out.setdefault(key, {})[str(seed)] = {
                    "best": values[best],
                    "best_epoch": epochs[best],
                    "last_epoch": epochs[-1],
                    "second_half_gain": max(values) - half,
                }
    return out


def _plateau_table(curves: dict[str, dict[str, Any]], metric: str) -> str:
    lines = [f"{metric} curves (every map_freq epochs): best, its epoch / last, 2nd-half gain"]
    for key, by_seed in curves.items():
        cells = [
            f"s{seed} {c['best']:.3f} @{c['best_epoch']:.0f}/{c['last_epoch']:.0f} "
            f"+{c['second_half_gain']:.3f}"
            for seed, c in by_seed.items()
        ]
        lines.append(f"  {key:<32} " + "  ".join(cells))
    return "\n".join(lines)


def _ranking_table(ranked: dict[str, dict[str, Any]]) -> str:
    lines = [
        "pseudo-label candidates ranked by each signal (teacher's detections on the unlabeled "
        "part, IoU 0.5 against the hidden gt; at k = STAC's count):",
        f"{'signal':<22} {'AP':>15} {'precision@k':>15} {'recall@k':>15}",
    ]
    for signal, figures in ranked.items():
        cells = [f"{figures[f]['mean']:.3f} ± {figures[f]['std']:.3f}" for f in figures]
        lines.append(f"{signal:<22} " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def _table(summary: dict[str, Any]) -> str:
    def pm(d: dict[str, float], fmt: str = ".4f") -> str:
        return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"

    lines = [
        f"{'model':<16} {'test mAP':>17} {'test mAP50':>17} {'gain %':>13} {'vs restart %':>13} "
        f"{'pseudo':>11} {'precision':>13} {'recall':>13}"
    ]
    t = summary["teacher"]
    lines.append(f"{'teacher':<16} {pm(t['map']):>17} {pm(t['map50']):>17}")
    for name, s in summary.items():
        if name == "teacher":
            continue
        lines.append(
            f"{name:<16} {pm(s['map']):>17} {pm(s['map50']):>17} {pm(s['gain_pct'], '.1f'):>13} "
            f"{pm(s['gain_vs_restart_pct'], '.1f'):>13} {pm(s['pseudo_labels'], '.0f'):>11} "
            f"{pm(s['precision'], '.3f'):>13} {pm(s['recall'], '.3f'):>13}"
        )
    return "\n".join(lines)


def _colour(name: str) -> str:
    """Teacher grey, the restart control orange, the 3D study's oracles (they read the hidden
    gt: bounds, not methods) purple, the methods blue."""
    if name == "teacher":
        return "grey"
    if name == "restart":
        return "C1"
    return "C4" if any(o in name for o in ("fixmd", "nofd")) else "C0"


def _plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Test mAP@[.5:.95] and the gain over the teacher (mean ± std over seeds), one row per
    model: horizontal bars, so that any number of variants stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    rows = range(len(names))
    colours = [_colour(n) for n in names]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, 1.2 + 0.32 * len(names)), sharey=True, constrained_layout=True
    )
    means = [summary[n]["map"]["mean"] for n in names]
    ax1.barh(rows, means, xerr=[summary[n]["map"]["std"] for n in names], color=colours,
             capsize=3)  # fmt: skip
    ax1.axvline(means[0], color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("test mAP@[.5:.95] (mean ± std)")
    gains = [summary[n].get("gain_pct", {"mean": 0.0, "std": 0.0}) for n in names]
    ax2.barh(rows, [g["mean"] for g in gains], xerr=[g["std"] for g in gains], color=colours,
             capsize=3)  # fmt: skip
    ax2.axvline(0.0, color="grey", lw=0.8)
    ax2.axvline(6.0, color="green", lw=0.8, ls=":", label="target +6 %")
    ax2.set_xlabel("gain over the same seed's teacher, % (mean ± std)")
    ax2.legend(loc="best", fontsize=8)
    ax1.set_yticks(list(rows), names)
    ax1.invert_yaxis()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rankings(ranked: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Per selection signal, the AP of its ranking of the teacher's candidates and its
    precision at STAC's count (mean ± std over seeds), the score's drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(ranked, key=lambda n: -ranked[n]["ap"]["mean"])
    rows = range(len(names))
    colours = ["C1" if n == "score" else "C2" if n == "pcorrect" else "C0" for n in names]
    fig, axes = plt.subplots(
        1, 2, figsize=(10, 1.2 + 0.32 * len(names)), sharey=True, constrained_layout=True
    )
    for ax, figure, label in (
        (axes[0], "ap", "AP of the ranking against the hidden gt"),
        (axes[1], "precision_at_k", "precision at STAC's count (score > 0.4)"),
    ):
        stats = [ranked[n][figure] for n in names]
        ax.barh(rows, [s["mean"] for s in stats], xerr=[s["std"] for s in stats],
                color=colours, capsize=3)  # fmt: skip
        ax.axvline(ranked["score"][figure]["mean"], color="C1", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_xlim(0, 1)
    axes[0].set_yticks(list(rows), names)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prepare_tracking(args: argparse.Namespace, data: Path) -> None:
    """The MLflow store and the bench's experiment, created once before the seed processes
    open them (SQLite schema creation is not safe to race)."""
    from detloop.orchestrator.engine.tracking import prepare_store

    prepare_store(_config(args, data, 0, []))


def _save(
    args: argparse.Namespace,
    variants: list[str],
    records: dict[str, dict[int, dict[str, Any]]],
    wall: float,
    final: bool = False,
) -> None:
    """Summary, JSON and plot of what is done so far (after every seed); the table at the end."""
    done = {v: r for v, r in records.items() if r}
    if not done:
        return
    summary = summarise(done)
    ranked = rankings(done)
    curves = {m: plateaus(done, m) for m in ("val_map", "val_map50")}
    classes = class_table(done)
    if final:
        print(_table(summary))
        if ranked:
            print(_ranking_table(ranked))
        print(class_table_text(classes))
        for metric, by_round in curves.items():
            if by_round:
                print(_plateau_table(by_round, metric))
        print(f"wall time: {wall / 60:.1f} min for seeds {args.seeds} x {len(variants)} variants")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"ssl_{args.tag}" if args.tag else "ssl"
    seeds = args.seeds.replace(",", ", ")
    # with early stopping the step counts are caps, not what each model trained
    cap = "≤ " if "train.early_stopping=true" in args.overrides else ""
    title = (
        f"SSL on digits-det small (r = 0.7), 10 % labeled, seeds {seeds}: teacher "
        f"{cap}{args.teacher_steps} steps, students {cap}{args.student_steps} from "
        + ("the teacher" if args.student_init == "teacher" else "the initial weights")
    )
    _plot(summary, RESULTS / f"{name}.png", title)
    if "score" in ranked:
        _plot_rankings(
            ranked,
            RESULTS / f"{name}_rankings.png",
            f"Pseudo-label candidates of the teachers (seeds {seeds}) ranked by each signal",
        )
    budget = _budget(args)
    doc = {
        "seeds": [int(s) for s in args.seeds.split(",") if s],
        "variants": variants,
        "budget": budget,
        "overrides": args.overrides,
        "wall_s": wall,  # this invocation's (a resumed bench reuses finished runs)
        # every run's own phase time, summed: the compute the results cost, resumed or not
        "run_seconds_total": sum(
            float(r.get("run_seconds", 0.0)) for runs in records.values() for r in runs.values()
        ),
        "complete": final,
        "summary": summary,
        "rankings": ranked,
        "plateaus": curves,
        "classes": classes,
        "records": records,
    }
    path = write_result(name, doc)
    if final:
        print(f"wrote {path} and {RESULTS / (name + '.png')}")


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "student_init": args.student_init,
        "selftrain_rounds": args.selftrain_rounds,
        # only when set: the stamps of roots made before the option stay valid
        **({} if args.selftrain_steps is None else {"selftrain_steps": args.selftrain_steps}),
    }


def _claim_root(args: argparse.Namespace) -> None:
    """One budget per runs root. A run's name does not carry the training budget, so a second
    budget in the same root would resume the first one's runs (with their stored config):
    refused, naming the root's budget. ``--teachers-from ROOT`` seeds a new root with another
    root's finished teachers — the teacher cache is keyed by what the teacher depends on (pool,
    seed, split, model, train, predict config), so a teacher is only reused where it is the
    same teacher."""
    import json
    import shutil

    root: Path = args.runs_root
    stamp = root / "bench_budget.json"
    budget = _budget(args)
    if stamp.exists():
        held = json.loads(stamp.read_text())
        if held != budget:
            raise SystemExit(
                f"{stamp} holds runs of another budget ({held}); pass another --runs-root "
                f"(with --teachers-from {root} to reuse its teachers)"
            )
    cache = None if args.teachers_from is None else Path(args.teachers_from) / NAME / "_warmup"
    if cache is not None and not cache.is_dir():
        raise SystemExit(f"{cache}: no teacher cache to reuse")
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(budget, indent=1) + "\n")
    if cache is not None:
        for entry in sorted(cache.iterdir()):
            target = root / NAME / "_warmup" / entry.name
            if (entry / "complete").exists() and not target.exists():
                shutil.copytree(entry, target)
                print(f"teacher {entry.name} reused from {args.teachers_from}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="restart,stac,alluncert,selftrain,ema")
    parser.add_argument("--teacher-steps", type=int, default=5000)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--student-init", choices=("teacher", "initial"), default="teacher")
    parser.add_argument("--selftrain-rounds", type=int, default=1)
    parser.add_argument(
        "--selftrain-steps",
        type=int,
        default=None,
        help="each self-training round's steps (default: ssl.selftrain_epochs decide)",
    )
    parser.add_argument("--jobs", type=int, default=3, help="seeds run side by side")
    parser.add_argument(
        "--runs-root",
        type=Path,
        default=REPO / "runs" / "bench_ssl",
        help="one budget per root (another budget: another root)",
    )
    parser.add_argument(
        "--teachers-from", type=Path, default=None, help="a runs root whose teachers to reuse"
    )
    parser.add_argument(
        "--balanced-test",
        action="store_true",
        help="test on the class-balanced split of the same data (pool and val unchanged; "
        "rare-class AP on ~90 boxes a class instead of 13; its teachers are cached apart, "
        "their test figures differ; bench/ssl_retest.py re-tests stored models instead)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tag", default="", help="results as ssl_<tag>.json (default ssl.json)")
    args = parser.parse_args()
    args.runs_root = args.runs_root.resolve()
    local_env()
    data = digits_data(0.7, args.balanced_test)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        try:
            variant_sets(variant)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    _claim_root(args)
    _prepare_tracking(args, data)
    t0 = time.perf_counter()
    records: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(seed_records, args, data, variants, s): s for s in seeds}
        for future in as_completed(futures):
            for variant, record in future.result().items():
                records[variant][futures[future]] = record
            _save(args, variants, records, time.perf_counter() - t0)
    _save(args, variants, records, time.perf_counter() - t0, final=True)


if __name__ == "__main__":
    main()
