"""Verbs of the loops: ``run``, ``resume``, ``status``, ``import-labels``, ``grid``, ``report``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from detloop import console
from detloop.cli.common import UsageError, add_set_option
from detloop.config import ExperimentConfig, config_to_dict, load_config
from detloop.data.rundir import RunDir

if TYPE_CHECKING:
    from detloop.orchestrator.loops.execute import LoopOutcome

logger = logging.getLogger(__name__)


def _out(text: str) -> None:
    print(text)  # noqa: T201 - command output


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run an active-learning loop (resumes if it exists)")
    p.add_argument("config", type=Path)
    add_set_option(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--fresh", action="store_true", help="start over in a new run directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a run where it stopped")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="phase, iteration and image counts of a run")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("import-labels", help="import human labels of the queried images")
    p.add_argument("run_dir", type=Path)
    p.add_argument("file", type=Path, help="COCO JSON with the labels of the queried images")
    p.set_defaults(func=cmd_import_labels)

    p = sub.add_parser("grid", help="run strategies x seeds concurrently on one Ray cluster")
    p.add_argument("config", type=Path)
    p.add_argument(
        "--strategies",
        required=True,
        help="comma-separated strategy names (AL query strategies; with `loop: ssl` the "
        "pseudo-label selection strategies)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one more grid dimension: the config key takes each value, crossed with the "
        "strategies and seeds (repeatable), e.g. --vary ssl.oracle_variant=none,nofd,nomd "
        "for the 3D study or --vary ssl.pls=top,bot,rand; the run name must tell the values "
        "apart (ssl.pls and ssl.oracle_variant are in it)",
    )
    add_set_option(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="AL curves (PNG) and a markdown table of runs")
    p.add_argument("run_dirs", type=Path, nargs="*")
    p.add_argument("--experiment", help="every run of this experiment under --runs-root")
    p.add_argument("--runs-root", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, help="output directory (default: the experiment's)")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="read the --experiment's runs from this MLflow store (e.g. a tracking server, "
        "http://HOST:PORT) instead of the run directories; credentials come from "
        "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, never the URI",
    )
    p.set_defaults(func=cmd_report)


def _print_config(cfg: ExperimentConfig) -> None:
    """The resolved config, then which loop runs and every strategy as it was parsed."""
    from detloop.selectors.strategy import explain

    _out(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    if (workers := cfg.train.workers) > 1:
        _out(f"# training: {workers} Ray Train workers, global batch {cfg.train.batch_size}")
    if cfg.loop == "autolabel":
        t = cfg.thresholding
        _out("# loop: auto-labeling (AutoLabelRun)")
        _out(f"# model: {cfg.autolabel.model}")
        _out(f"# rule: {t.thr_sel_uncert} combined, FD@CD(b={t.thr_fpr_tpr}), unit {t.thr_unit}")
        return
    if cfg.loop == "ssl":
        _print_ssl(cfg)
        return
    spec = cfg.al.strategy
    _out("# loop: active learning (ActiveLearningLoop)" + (" with SSL" if cfg.al.ssl else ""))
    _out(f"# strategy: {spec.name}")
    for line in explain(spec):
        _out(f"#   {line}")
    if cfg.al.ssl:
        _out(f"# pseudo-label selection: {cfg.ssl.selection_strategy.name}")
    if cfg.autolabel.after_loop:
        _out("# then: auto-labeling of the rest of the pool with the final model")


def _print_ssl(cfg: ExperimentConfig) -> None:
    """The SSL loop's lines of ``--dry-run``: its selection, teacher, student and studies."""
    ssl = cfg.ssl
    _out("# loop: semi-supervised (SemiSupervisedLoop)")
    _out(f"# selection strategy: {ssl.selection_strategy.name}")
    _out(f"#   {ssl.selection_strategy}")
    _out(f"# teacher strategy: {ssl.teacher_strategy.name or '(plain STAC)'}")
    for line in _teacher_blocks(cfg):
        _out(f"#   {line}")
    tau = (
        f"tau fitted on validation for precision {ssl.target_precision:g}"
        if ssl.target_precision is not None
        else f"tau {ssl.tau}"
    )
    _out(
        f"# teacher: {ssl.teacher}; {tau}; lambda {ssl.stac_lambda}; "
        f"pseudo box weight {ssl.pseudo_box_weight:g}"
    )
    if ssl.method == "stac":
        start = "the teacher's weights" if ssl.student_init == "teacher" else "model.weights"
        rejected = "ignore regions" if ssl.rejected == "ignore" else "background"
        schedule = ssl.student_lr_schedule or cfg.train.lr_schedule
        _out(
            f"# student: from {start}; rejected teacher detections are {rejected}; "
            f"lr schedule {schedule}"
        )
    if ssl.pls != "none":  # §11.7
        _out(
            f"# PLS: {ssl.pls} (top_k {ssl.pls_top_k:g} of the pseudo-labeled images by "
            f"D = {1 - ssl.pls_beta:g}·S + {ssl.pls_beta:g}·C, δ_S {ssl.pls_delta:g})"
        )
    if ssl.oracle_variant != "none":  # §11.8
        _out(f"# 3D study: {ssl.oracle_variant} (pseudo-labels corrected with the pool's GT)")
    if ssl.method == "csd":  # round 1 is a CSD model instead of a student
        be = f"on ({ssl.csd_be_scope})" if ssl.csd_be else "off"
        _out(
            f"# method: csd (round 1, no pseudo-labels): unlabeled:labeled {ssl.csd_ratio}, "
            f"{ssl.csd_consistency}, background elimination {be}, ramp "
            f"{'on' if ssl.csd_ramp else 'off'}, split {ssl.csd_split}"
        )


def _teacher_blocks(cfg: ExperimentConfig) -> list[str]:
    """One line per building block of ``ssl.teacher_strategy`` (ALGORITHMS §11.3, §11.4)."""
    ssl = cfg.ssl
    spec, out = ssl.teacher_strategy, []
    if spec.rcc:
        opts = [
            o
            for o, on in (
                ("scale", spec.rcc_scale),
                ("manual_augmentations", spec.rcc_manual_augmentations),
                ("full_im", spec.rcc_full_im),
            )
            if on
        ]
        targets = ssl.rcc_classes if ssl.rcc_classes is not None else f"the {ssl.rcc_k} rarest"
        out.append(
            f"rcc: rare-class collages of {targets} classes (seed {ssl.rcc_seed}; options: "
            f"{', '.join(opts) or 'none'}) join the labeled part after the split"
        )
    if spec.imscore:
        out.append(
            f"imscore: each labeled object weighs its RCF class weight "
            f"[{ssl.rcf_lowest:g}, {ssl.rcf_highest:g}] from the labeled counts"
        )
    return out


def _report_outcome(outcome: LoopOutcome) -> int:
    """What a person reads when a loop stops: its results, or how to continue it."""
    if outcome.status in ("failed", "bad_input"):
        sys.stderr.write(f"detloop: {outcome.stop_message}\n")
    elif outcome.status == "done":
        _out(run_summary_text(outcome.run))
    return outcome.exit_code


def run_summary_text(run: RunDir) -> str:
    """The summary of a finished run of any loop (with its auto-labeling, when it had one)."""
    from detloop.reports.al_curves import run_summary
    from detloop.reports.autolabel_report import autolabel_iteration, autolabel_summary, model_line
    from detloop.reports.ssl_report import is_ssl_run, ssl_summary

    kind = run.read_meta().get("kind")
    parts = []
    if kind == "autolabel":
        parts.append(f"autolabel: {run.path}")
        parts.append(model_line(run) or "")
    else:
        parts.append(ssl_summary(run) if is_ssl_run(run) else run_summary(run))
    it = autolabel_iteration(run)
    if it is not None:
        parts.append(autolabel_summary(run, it))
    return "\n".join(p for p in parts if p)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        _print_config(cfg)
        return 0
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute

    run = create_run(cfg, fresh=args.fresh)
    console.say("run directory: %s", run.path)
    return _report_outcome(execute(run, stored_config(run)))


def _run_dir(path: Path) -> RunDir:
    run = RunDir(path)
    if not run.exists():
        raise UsageError(f"{path} is not a run directory (no run.json)")
    return run


def cmd_resume(args: argparse.Namespace) -> int:
    from detloop.orchestrator.engine.runs import check_inputs, stored_config
    from detloop.orchestrator.loops.execute import execute

    run = _run_dir(args.run_dir)
    cfg = stored_config(run)
    check_inputs(cfg)
    return _report_outcome(execute(run, cfg))


def cmd_status(args: argparse.Namespace) -> int:
    from detloop.data.pool import PoolState
    from detloop.orchestrator.engine.journal import Journal

    run = _run_dir(args.run_dir)
    journal = Journal(run)
    pos = journal.position
    _out(f"run: {run.path}")
    _out(f"strategy: {journal.meta.get('strategy')}  seed: {journal.meta.get('seed')}")
    if pos is None:
        _out("phase: not started")
    else:
        _out(f"iteration: {pos.iteration}  phase: {pos.phase} ({pos.status})")
    pool = PoolState.load(run)
    for split in ("pool", "val", "test"):
        counts = {k: v for k, v in pool.counts(split).items() if v}
        if counts:
            _out(f"{split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    _out(f"labeled boxes: {pool.n_labeled_boxes()}")
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    from detloop.orchestrator.loops.human import import_labels

    run = _run_dir(args.run_dir)
    n_images, n_boxes = import_labels(run, args.file)
    _out(
        f"imported {n_boxes} boxes for {n_images} images; continue with\n"
        f"  detloop resume {run.path}"
    )
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from detloop.orchestrator.loops.grid import run_grid

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not strategies or not seeds:
        raise UsageError("--strategies and --seeds need at least one value each")
    outcomes = run_grid(args.config, args.overrides, strategies, seeds, parse_vary(args.vary))
    for outcome in outcomes:
        _report_outcome(outcome)
    return max((o.exit_code for o in outcomes), default=0)


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` → ``["a", "b", "[1,2]"]``: commas inside brackets or braces stay."""
    out: list[str] = []
    depth = start = 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [v.strip() for v in out if v.strip()]


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--vary KEY=V1,V2`` options as (key, values), in the order given."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = split_values(raw)
        if not sep or not key.strip() or not values:
            raise UsageError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. ssl.pls=top,bot")
        if key.strip() in (k for k, _ in out):
            raise UsageError(f"--vary {key.strip()} is given twice; list its values once")
        out.append((key.strip(), values))
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from detloop.data.rundir import RunsRoot
    from detloop.reports.al_curves import write_report

    if args.tracking_uri:
        return _tracked_report(args)
    runs = [_run_dir(p) for p in args.run_dirs]
    out = args.out
    if args.experiment:
        root = RunsRoot(args.runs_root)
        runs += root.runs_of(args.experiment)
        out = out or root.experiment(args.experiment)
    if not runs:
        raise UsageError("no runs: give RUN_DIR... or --experiment NAME")
    png, md = write_report(runs, out or runs[0].path.parent)
    _out(md.read_text())
    _out(f"AL curve: {png}")
    return 0


def _tracked_report(args: argparse.Namespace) -> int:
    """``report --experiment NAME --tracking-uri URI``: the curves from the MLflow store."""
    from detloop.config import TrackingConfig
    from detloop.data.rundir import RunsRoot
    from detloop.reports.al_curves import tracked_curves, write_curves

    uri = str(args.tracking_uri)
    if not args.experiment or args.run_dirs:
        raise UsageError("--tracking-uri reads an --experiment NAME, not RUN_DIR...")
    if found := TrackingConfig.credentials_in(uri):
        raise UsageError(
            f"--tracking-uri holds {found}: give {TrackingConfig.redact(uri)} and set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    groups = tracked_curves(uri, args.experiment)
    if not groups:
        raise UsageError(f"no runs with AL curves in experiment {args.experiment!r} at {uri}")
    out = args.out or RunsRoot(args.runs_root).experiment(args.experiment)
    png, md = write_curves(groups, out)
    _out(md.read_text())
    _out(f"AL curve: {png}")
    return 0
