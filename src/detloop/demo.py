"""``make demo``: active learning, then auto-labeling, on the built-in digits-det data, on CPU.

Builds digits-det small and the backbone pretrained on the UCI digits that the config starts
from (each once, cached under ``data/``), runs the loop of ``configs/demo.yaml`` for ``random``
and one uncertainty strategy (the warm-up is computed once and shared); the uncertainty run
ends by auto-labeling what is left of its pool with its final model (``autolabel.after_loop``).
Prints mAP per labeled fraction for both, the share of the pool auto-labeled and how precise
those labels are against the hidden ground truth (beside a plain score threshold at the same
share), the images sent to review, where the review export and the final COCO dataset are,
writes the AL-curve PNG and tells how to open MLflow on the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from detloop import console
from detloop.config import ExperimentConfig
from detloop.data.rundir import RunDir
from detloop.runtime_env import apply_local_env

logger = logging.getLogger("detloop.demo")

REPO = Path(__file__).resolve().parents[2]


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo talks to a person


def ensure_dataset(root: Path, size: str, seed: int) -> None:
    """Build digits-det ``size`` under ``root`` unless it is already there."""
    from detloop.data.digits import make_digits

    if all((root / f"{s}.json").exists() for s in ("pool", "val", "test")):
        _say(f"data: {root} (already built)")
        return
    t0 = time.perf_counter()
    _say(f"data: building digits-det {size} under {root} ...")
    make_digits(root, size, seed=seed)
    _say(f"data: built in {time.perf_counter() - t0:.0f} s")


def ensure_pretrained(cfgs: list[ExperimentConfig], folder: Path) -> None:
    """Build the pretrained backbone in ``folder`` when a config starts from it and it is not
    built yet with the recipe's settings (``detloop pretrain digits --out folder``)."""
    from detloop.learners.pretrain import WEIGHTS_FILE, PretrainSettings, cached, pretrain_backbone

    target = (folder / WEIGHTS_FILE).resolve()
    wanted = {
        c.model.preset for c in cfgs if c.model.weights and c.model.weights.resolve() == target
    }
    for preset in sorted(wanted):
        settings = PretrainSettings(preset=preset)
        if cached(folder, settings) is None:
            _say(f"pretrained backbone: training the {preset} backbone on the UCI digits ...")
        result = pretrain_backbone(folder, settings)
        how = "already built" if result.reused else f"built in {result.metadata['seconds']:.0f} s"
        acc = result.metadata["accuracy"]
        _say(f"pretrained backbone: {result.weights} ({how}, held-out accuracy {acc:.3f})")


def _autolabel(strategy: str) -> list[str]:
    """An uncertainty strategy's run ends by auto-labeling the rest of its pool."""
    return [] if strategy == "random" else ["autolabel.after_loop=true"]


def main(argv: Sequence[str] | None = None) -> int:
    apply_local_env()
    parser = argparse.ArgumentParser(prog="python -m detloop.demo", description=__doc__)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--strategies", default="random,entropy")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits-small")
    parser.add_argument("--size", default="small")
    parser.add_argument(
        "--pretrained",
        type=Path,
        default=REPO / "data" / "pretrained-digits-tiny",
        help="where the config's pretrained backbone is built (when the config names it)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--validate-only", action="store_true", help="build data, check config")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    console.quiet_dependency_warnings()
    with console.session(quiet=False):  # phase lines, worker bars, iteration lines as the CLI
        return _main(args)


def _main(args: argparse.Namespace) -> int:

    from detloop.config import ConfigError, load_config
    from detloop.data.errors import DataError
    from detloop.orchestrator.engine.runs import check_inputs

    t_start = time.perf_counter()
    try:
        ensure_dataset(args.data, args.size, seed=0)
        strategies = [s for s in args.strategies.split(",") if s]
        cfgs = [
            load_config(args.config, [*args.overrides, f"al.strategy={s}", *_autolabel(s)])
            for s in strategies
        ]
        if not args.validate_only:
            ensure_pretrained(cfgs, args.pretrained)
            for cfg in cfgs:
                check_inputs(cfg)
    except (ConfigError, DataError) as exc:
        _say(f"demo: error: {exc}")
        return 2
    _say(f"config: {args.config} is valid for strategies {', '.join(strategies)}")
    if args.validate_only:
        return 0
    return _run(cfgs, t_start)


def _run(cfgs: list[ExperimentConfig], t_start: float) -> int:
    from detloop.data.rundir import RunsRoot
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute
    from detloop.reports.al_curves import run_summary, write_report

    runs = []
    for cfg in cfgs:
        run = create_run(cfg)
        _say(f"\n== strategy {cfg.al.strategy.name}: {run.path}")
        outcome = execute(run, stored_config(run))
        if outcome.exit_code != 0:
            _say(f"demo: {outcome.stop_message}")
            return outcome.exit_code
        _say(run_summary(run))
        runs.append(run)
    root = RunsRoot(cfgs[0].runs_root)
    png, md = write_report(runs, root.experiment(cfgs[0].name))
    _say("\n== mAP per labeled fraction (validation split)\n" + md.read_text())
    _say(f"AL curve: {png}")
    for run in runs:
        _autolabel_story(run)
    _say(f"demo wall time: {time.perf_counter() - t_start:.0f} s")
    _say(
        "Open the runs in MLflow with\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {root.tracking_uri} "
        f"--default-artifact-root {root.artifacts.resolve().as_uri()}\n"
        "then browse http://127.0.0.1:5000 (experiment "
        f"'{cfgs[0].name}', compare the runs side by side)."
    )
    return 0


def _autolabel_story(run: RunDir) -> None:
    """What the auto-labeling of ``run`` did, and the labeled dataset it leaves."""
    from detloop.data.export import export_coco
    from detloop.reports.autolabel_report import autolabel_iteration, autolabel_summary

    it = autolabel_iteration(run)
    if it is None:
        return
    _say(f"\n== auto-labeling the rest of the pool ({run.name})\n" + autolabel_summary(run, it))
    out = run.exports / "dataset.coco.json"
    counts = export_coco(run, out, boxes="dataset")
    _say(
        f"labeled dataset (people's labels, auto-labels, validation ground truth; provenance "
        f"per box): {out} ({counts['images']} images, {counts['annotations']} boxes)"
    )


if __name__ == "__main__":
    sys.exit(main())
