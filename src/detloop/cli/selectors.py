"""Selector verbs: ``strategies``, ``explain-strategy``, ``select`` and ``oss``."""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from pathlib import Path
from typing import Any

from detloop import seeding
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_json, read_table, write_table
from detloop.data.min_score import resolve_min_score
from detloop.data.rundir import RunDir, RunsRoot
from detloop.selectors.strategy import MODIFIERS, StrategyError, explain, parse_strategy


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _usage(message: str) -> Exception:
    from detloop.cli.common import UsageError

    return UsageError(message)


def cmd_strategies(args: argparse.Namespace) -> int:
    from detloop.selectors.scores import list_scores

    pattern = args.filter or "*"
    scores = list_scores(pattern, include_columns=args.columns)
    mods = {k: v for k, v in MODIFIERS.items() if fnmatch.fnmatchcase(k, pattern)}
    if scores:
        _out("scores (last token of a strategy):")
        for s in scores:
            _out(f"  {s.name:<14} {s.kind:<7} {s.description}")
    if mods:
        _out("modifiers (stacked before the score, e.g. perc_calib_norm_mean_albox):")
        for name, text in mods.items():
            _out(f"  {name:<14} {text}")
    if not scores and not mods:
        _out(f"nothing matches {pattern!r}")
        return 1
    return 0


def _explain_ssl(kind: str, name: str) -> int:
    """``--kind selection`` (``ssl.selection_strategy``) or ``teacher``
    (``ssl.teacher_strategy``)."""
    from detloop.selectors.explain_ssl import explain_selection, explain_teacher
    from detloop.selectors.pseudo import parse_pseudo_strategy, parse_teacher_strategy

    try:
        if kind == "teacher":
            lines = explain_teacher(parse_teacher_strategy(name))
        else:
            lines = explain_selection(parse_pseudo_strategy(name))
    except (StrategyError, ValueError) as exc:
        raise _usage(str(exc)) from None
    _out(f"{kind} strategy: {name}")
    for line in lines:
        _out(f"  {line}")
    return 0


def _other_kinds(name: str) -> str:
    """' (it is a teacher strategy: --kind teacher)' when ``name`` parses as one."""
    from detloop.selectors.pseudo import parse_pseudo_strategy, parse_teacher_strategy

    for kind, parse in (("teacher", parse_teacher_strategy), ("selection", parse_pseudo_strategy)):
        try:
            parse(name)
        except (StrategyError, ValueError):
            continue
        return f" (it is an SSL {kind} strategy: add --kind {kind})"
    return ""


def cmd_explain(args: argparse.Namespace) -> int:
    from detloop.selectors.scores import get_score

    if args.kind != "al":
        return _explain_ssl(args.kind, args.name)
    try:
        spec = parse_strategy(args.name)
    except StrategyError as exc:
        raise _usage(str(exc) + _other_kinds(args.name)) from None
    info = get_score(spec.score)
    _out(f"spec: {spec}")
    for line in explain(spec):
        _out(f"  {line}")
    extra = (
        f", components {', '.join(info.components)}, fusion {info.fusion}"
        if info.components
        else ""
    )
    _out(f"  score {info.name}: {info.description} (kind {info.kind}{extra})")
    _out(f"  needs columns: {', '.join(info.columns)}" + (" (as *_cal)" if spec.calib else ""))
    return 0


def _run_settings(run: RunDir) -> tuple[int, tuple[float | None, float | None]]:
    """(seed, configured ``al.min_score`` and ``predict.min_score``) of a run's config, with
    defaults when unknown."""
    if not run.exists():
        return 0, (None, None)
    meta = run.read_meta()
    cfg = meta.get("config") or {}
    configured = ((cfg.get("al") or {}).get("min_score"),
                  (cfg.get("predict") or {}).get("min_score"))  # fmt: skip
    return int(meta.get("seed", cfg.get("seed", 0)) or 0), configured


def cmd_select(args: argparse.Namespace) -> int:
    from detloop.selectors.columns import MissingColumnError
    from detloop.selectors.pipeline import SelectContext, select

    run = RunDir(args.run_dir)
    try:
        spec = parse_strategy(args.strategy)
    except StrategyError as exc:
        raise _usage(str(exc)) from None
    pred_file = run.predictions_file(args.iteration)
    if not pred_file.exists():
        raise DataError(str(pred_file), None, None, "no predictions for this iteration")
    seed, configured = _run_settings(run)
    thr_file = run.thresholds_file(args.iteration)
    ctx = SelectContext(
        min_score=resolve_min_score(args.min_score, *configured),
        rng=seeding.rng(args.seed if args.seed is not None else seed, args.iteration, "select"),
        iteration=args.iteration,
        thresholds=read_json(thr_file) if thr_file.exists() else None,
    )
    predictions = read_table(schema.PREDICTIONS, pred_file)
    try:
        table = select(predictions, run.read_images(), spec, args.budget, ctx)
    except (MissingColumnError, ValueError) as exc:
        raise DataError(str(pred_file), None, getattr(exc, "column", None), str(exc)) from None
    out = Path(args.out) if args.out else run.selection_file(args.iteration)
    write_table(table, schema.SELECTION, out)
    n_sel = sum(table["selected"].to_pylist())
    _out(f"{spec.name}: selected {n_sel} of {table.num_rows} candidates -> {out}")
    return 0


def cmd_oss(args: argparse.Namespace) -> int:
    from detloop.config import load_config
    from detloop.orchestrator.evaluation.oss import run_oss, write_outputs

    cfg = load_config(args.config, args.overrides)
    root = RunsRoot(Path(cfg.runs_root))
    runs = [RunDir(p) for p in args.run] if args.run else root.runs_of(cfg.name)
    iterations = [int(x) for x in args.iterations.split(",") if x.strip()]
    rng = seeding.rng(42 if cfg.compat_seed else cfg.seed, 0, "oss")
    out = Path(args.out) if args.out else root.oss_dir(cfg.name)
    if args.mode == "reliability":
        return _oss_reliability(args, runs, iterations, rng, out)
    rows, summary = run_oss(runs, iterations, args.reference, args.formula, rng, args.n_resample)
    write_outputs(rows, _clean(summary), out)
    for sid, s in summary["sets"].items():
        _out(f"{sid:<40} oss {s['oss']:.4f}  map {s['map']:.4f}")
    corr = summary["oss_vs_map"]
    _out(f"OSS vs mAP: Pearson r {corr['pearson_r']:.3f}, Kendall tau {corr['kendall_tau']:.3f}")
    _out(f"written to {out}")
    return 0


def _oss_reliability(
    args: argparse.Namespace, runs: list[RunDir], iterations: list[int], rng: Any, out: Path
) -> int:
    import pyarrow as pa

    from detloop.data.io import write_json, write_parquet
    from detloop.orchestrator.evaluation.oss_reliability import plot_reliability, run_reliability

    rows, summary = run_reliability(
        runs, iterations, seeds=args.subset_seeds, subsets=args.subsets, fraction=args.fraction,
        formula=args.formula, rng=rng, n_resample=args.n_resample,
    )  # fmt: skip
    write_parquet(pa.Table.from_pylist(rows), out / "reliability.parquet")
    write_json(_clean(summary), out / "reliability_summary.json")
    plot_reliability(rows, summary, out / "reliability.png")
    corr = summary["oss_vs_tau"]
    _out(f"{len(summary['models'])} models ranked by {summary['ranked_by']}; "
         f"{len(rows)} subsets of {summary['subset_images']} validation images")  # fmt: skip
    _out(f"OSS vs tau: Pearson r {corr['pearson_r']:.3f}, Kendall tau {corr['kendall_tau']:.3f}")
    for name in ("tau_full_val", "tau_subsets_mean", "tau_top_s_mean"):
        value = summary[name]
        _out(f"{name:<17} {'-' if value is None else f'{value:.3f}'}")
    _out(f"written to {out}")
    return 0


def _clean(obj: Any) -> Any:
    """NaN/inf to None, so the summary is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def register(sub: Any) -> None:
    """Add the selector verbs to the ``detloop`` sub-command parser."""
    from detloop.cli.common import add_set_option

    p = sub.add_parser("strategies", help="list AL scores and modifiers")
    p.add_argument("--filter", help="glob on names, e.g. '*box'")
    p.add_argument("--columns", action="store_true", help="also list predictions columns")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("explain-strategy", help="parse a strategy name and show its stages")
    p.add_argument("name")
    p.add_argument(
        "--kind",
        choices=("al", "selection", "teacher"),
        default="al",
        help="al.strategy (default), ssl.selection_strategy or ssl.teacher_strategy",
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("select", help="recompute a selection from stored predictions")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--strategy", required=True)
    p.add_argument("--budget", type=int, required=True, help="number of images to select")
    p.add_argument("--min-score", type=float, help="default: the run's config, else 0.4")
    p.add_argument("--seed", type=int, help="default: the run's seed")
    p.add_argument("--out", help="write here instead of the iteration's selection.parquet")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("oss", help="object-based set similarity of AL training sets (§10)")
    p.add_argument("config", type=Path)
    add_set_option(p)
    p.add_argument("--run", action="append", help="run directory (default: every run)")
    p.add_argument("--iterations", default="1,2,3", help="comma-separated, default 1,2,3")
    p.add_argument("--reference", choices=["val", "pool"], default="val")
    p.add_argument("--formula", choices=["paper", "reference"], default="paper")
    p.add_argument("--n-resample", type=int, default=10_000)
    p.add_argument(
        "--mode",
        choices=["sets", "reliability"],
        default="sets",
        help="sets: OSS of the AL training sets vs mAP; reliability: which validation subsets "
        "rank the models as the reference does (§10)",
    )
    p.add_argument("--subsets", type=int, default=10, help="reliability: subsets per seed")
    p.add_argument("--subset-seeds", type=int, default=10, help="reliability: seeds")
    p.add_argument("--fraction", type=float, default=0.1, help="reliability: subset share")
    p.add_argument("--out", help="output folder (default <runs_root>/<name>/oss)")
    p.set_defaults(func=cmd_oss)
