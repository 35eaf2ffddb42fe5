"""Semi-supervised learning on digits-det small with class imbalance (r = 0.7), 10 % labeled.

(Named ssl_bench.py, not ssl.py: a script's folder comes first on sys.path, and a bench/ssl.py
would shadow the standard library's ssl module that pyarrow and MLflow import.)

For each seed: the supervised teacher (round 0, shared by every variant of the seed through
the teacher cache) and one student per variant —

    stac       STAC: pseudo-labels with teacher score > τ = 0.4 (§11.1)
    alluncert  uncertainty selection: certainty of (rel. MC std, rel. aleatoric std, MC class)
    ental      uncertainty selection: entropy + aleatoric certainty, weighted
    combo      cost-sensitive selection: u = w·(entropy, rel. al) < δ̄ of §7 on calibrated columns
    selftrain  STAC then self-training rounds (re-predict with the student, retrain from it)
    ema        an online mean teacher labeling each step (burn-in = the teacher)

— with test mAP@[.5:.95] and mAP50 of every model and the precision/recall of its pseudo-labels
at IoU 0.5 against the hidden ground truth. Prints a table (mean ± std over seeds, relative gain
over the teacher), writes bench/results/ssl.json and bench/results/ssl.png, and the wall time.

    python bench/ssl_bench.py [--seeds 0,1,2] [--variants stac,alluncert,ema]
        [--set train.max_steps=500]

Models start from the config's pretrained backbone (built once, as ``make demo`` does) and train
for its budget (``configs/ssl_demo.yaml``: 1,000 steps, about 40 teacher epochs and 4 student
epochs); ``--set train.early_stopping=true`` stops on val mAP50 instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchkit import REPO, RESULTS, local_env, seed_stats, ssl_round_figures, write_result

VARIANTS: dict[str, list[str]] = {
    "stac": ["ssl.selection_strategy=score"],
    "alluncert": ["ssl.selection_strategy=pseudoscore_alluncert"],
    "ental": ["ssl.selection_strategy=pseudoscore_ental"],
    "combo": ["ssl.selection_strategy=calib_combo"],
    "selftrain": ["ssl.selection_strategy=selftrain_score"],
    "ema": ["ssl.selection_strategy=score", "ssl.teacher=ema"],
}


def _data() -> Path:
    from detloop.data.digits import make_digits

    data = REPO / "data" / "digits-small-imb07"
    if not (data / "test.json").exists():
        make_digits(data, "small", seed=0, imbalance=0.7)
    return data


def _run_variant(variant: str, seed: int, args: argparse.Namespace, data: Path) -> Any:
    from detloop.config import load_config
    from detloop.demo import ensure_pretrained
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute

    sets = [
        "name=ssl_bench",
        f"runs_root={args.runs_root}",
        f"seed={seed}",
        f"ssl.selftrain_rounds={args.selftrain_rounds}",
        *(f"data.{s}.source={data / (s + '.json')}" for s in ("pool", "val", "test")),
        *(f"data.{s}.images={data / 'images' / s}" for s in ("pool", "val", "test")),
        *VARIANTS[variant],
        *args.overrides,
    ]
    cfg = load_config(REPO / "configs" / "ssl_demo.yaml", sets)
    ensure_pretrained([cfg], REPO / "data" / "pretrained-digits-tiny")  # the config's backbone
    run = create_run(cfg)
    print(f"== {variant} seed {seed}: {run.path}", flush=True)
    if execute(run, stored_config(run)).exit_code != 0:
        raise SystemExit(f"loop failed: {run.path}")
    return run


def _record(run: Any) -> dict[str, Any]:
    """Per round: test mAP, mAP50 and the pseudo-labels' count, precision, recall."""
    return {"rounds": ssl_round_figures(run), "run": str(run.path)}


def summarise(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over seeds of the teacher and of each variant's final model, with the
    relative mAP gain over the teacher of the same seed and the pseudo-labels' quality."""
    out: dict[str, Any] = {}
    any_variant = next(iter(records.values()))
    teacher = {seed: rec["rounds"][0] for seed, rec in any_variant.items()}
    out["teacher"] = {m: seed_stats([t[m] for t in teacher.values()]) for m in ("map", "map50")}
    for variant, by_seed in records.items():
        finals = {seed: rec["rounds"][-1] for seed, rec in by_seed.items()}
        firsts = {seed: rec["rounds"][1] for seed, rec in by_seed.items()}
        gains = [100 * (finals[s]["map"] / teacher[s]["map"] - 1) for s in finals]
        out[variant] = {
            "map": seed_stats([f["map"] for f in finals.values()]),
            "map50": seed_stats([f["map50"] for f in finals.values()]),
            "gain_pct": seed_stats(gains),
            **{
                k: seed_stats([f.get(k, float("nan")) for f in firsts.values()])
                for k in ("pseudo_labels", "precision", "recall")
            },
        }
    return out


def _table(summary: dict[str, Any]) -> str:
    def pm(d: dict[str, float], fmt: str = ".4f") -> str:
        return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"

    lines = [
        f"{'model':<10} {'test mAP':>17} {'test mAP50':>17} {'gain %':>14} "
        f"{'pseudo':>13} {'precision':>13} {'recall':>13}"
    ]
    t = summary["teacher"]
    lines.append(f"{'teacher':<10} {pm(t['map']):>17} {pm(t['map50']):>17}")
    for name, s in summary.items():
        if name == "teacher":
            continue
        lines.append(
            f"{name:<10} {pm(s['map']):>17} {pm(s['map50']):>17} {pm(s['gain_pct'], '.1f'):>14} "
            f"{pm(s['pseudo_labels'], '.0f'):>13} {pm(s['precision'], '.3f'):>13} "
            f"{pm(s['recall'], '.3f'):>13}"
        )
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((ax1, "map"), (ax2, "map50")):
        means = [summary[n][metric]["mean"] for n in names]
        stds = [summary[n][metric]["std"] for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=["grey"] + ["C0"] * (len(names) - 1))
        ax.set_title(f"test {'mAP@[.5:.95]' if metric == 'map' else 'mAP50'} (mean ± std)")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("SSL on digits-det small (r = 0.7), 10 % labeled")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="stac,alluncert,combo,selftrain,ema")
    parser.add_argument("--selftrain-rounds", type=int, default=1)
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "bench_ssl")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    local_env()
    data = _data()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    records: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for seed in seeds:
        for variant in variants:
            records[variant][seed] = _record(_run_variant(variant, seed, args, data))
    wall = time.perf_counter() - t0
    summary = summarise(records)
    print(_table(summary))
    print(f"wall time: {wall / 60:.1f} min for {len(seeds)} seeds x {len(variants)} variants")
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(summary, RESULTS / "ssl.png")
    path = write_result(
        "ssl",
        {
            "seeds": seeds,
            "variants": variants,
            "overrides": args.overrides,
            "wall_s": wall,
            "summary": summary,
            "records": records,
        },
    )
    print(f"wrote {path} and {RESULTS / 'ssl.png'}")


if __name__ == "__main__":
    main()
