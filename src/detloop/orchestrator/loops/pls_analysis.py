"""``detloop pls``: the oracle analysis of one SSL round's pseudo-labels (ALGORITHMS §11.7).

The round's pseudo-labels are selected again from its predictions with the run's own config,
through the loop's function (``steps.pseudo_label``): the τ selection of that round before PLS
and the 3D study narrowed or corrected it, so a PLS run is analysed over all of its
pseudo-labeled images (the column ``trained`` says which kept their pseudo-labels for the
student). δ_S and β come from the config given (``ssl.pls_tau``, else ``ssl.tau``;
``ssl.pls_beta``). The per-image table and the report are ``selectors.ssl_pls_oracle``'s.

Outputs, in ``RUN/pls/<tag>/`` (default tag ``round_<r>``), written whole or not at all and
never over an existing analysis: ``images.parquet`` (``schema.PLS_ANALYSIS``), ``report.json``
and ``roc.png`` (ROC of S, C, D per missing-rate level). A bench calls ``pls_analysis``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_table, write_json, write_table
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.runs import stored_config
from detloop.orchestrator.loops import steps
from detloop.orchestrator.loops.pseudo_refine import pool_gt
from detloop.reports.pls_plots import pls_roc_plot
from detloop.selectors.ssl_pls import MISSING_LEVELS
from detloop.selectors.ssl_pls_oracle import (
    SIGNALS,
    pls_oracle_report,
    pls_oracle_table,
    signal_values,
)

TAG_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TABLE_FILE: Final = "images.parquet"
REPORT_FILE: Final = "report.json"
ROC_FILE: Final = "roc.png"


@dataclass(frozen=True)
class PlsAnalysis:
    """One analysis: where it was written, its per-image table and its report."""

    out_dir: Path
    table: pa.Table
    report: dict[str, Any]

    def summary(self) -> str:
        """The short table ``detloop pls`` prints."""
        r = self.report
        rate = r["mean_missing_rate"]
        lines = [
            f"pls round {r['round']} of {r['run']} (tag {r['tag']}): {r['images']} "
            f"pseudo-labeled images, {r['pseudo_labels']} pseudo-labels, {r['gt']} GT, "
            f"{r['missed_gt']} missed (mean missing rate {_num(rate)})",
            f"{'AUC, missing rate >':<22}" + "".join(f"{k:>8}" for k in r["positives"]),
        ]
        for name in SIGNALS:
            lines.append(
                f"  {name:<20}" + "".join(f"{_num(v):>8}" for v in r["auc"][name].values())
            )
        lines.append(
            f"  {'(images above)':<20}" + "".join(f"{v:>8}" for v in r["positives"].values())
        )
        m = r["mean"]
        lines.append(
            f"means over images: drate drop max {_num(m['drop_max'])}, mean "
            f"{_num(m['drop_mean'])}, std {_num(m['drop_std'])}; detections {_num(m['n_det'])}, "
            f"mean score {_num(m['mean_score'])}; S {_num(m['S'])}, C {_num(m['C'])}, "
            f"D {_num(m['D'])}"
        )
        files = ", ".join((TABLE_FILE, REPORT_FILE, ROC_FILE))
        lines.append(f"written: pls/{r['tag']}/ ({files})")
        return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _target(run: RunDir, tag: str) -> Path:
    """The analysis folder of ``tag``, refused when the tag is malformed or already used."""
    if not TAG_RE.match(tag):
        raise DataError("pls", None, "tag", f"tag {tag!r} must match {TAG_RE.pattern}")
    out = run.pls_dir(tag)
    if out.exists():
        raise DataError(
            str(out), None, None, f"the PLS analysis {tag!r} already exists; pass another --tag"
        )
    return out


def _ssl_config(run: RunDir) -> ExperimentConfig:
    """The run's own config (its pseudo-labels were selected with it)."""
    kind = run.read_meta().get("kind")
    if kind != "ssl":
        raise DataError(
            str(run.run_json),
            None,
            "kind",
            f"detloop pls analyses the pseudo-labels of an SSL run (loop: ssl); this run is "
            f"loop: {kind}",
        )
    return stored_config(run)


def _round_predictions(run: RunDir, iteration: int) -> pa.Table:
    path = run.predictions_file(iteration)
    if iteration < 1 or not path.exists():
        rounds = [r for r in run.iterations() if r >= 1 and run.predictions_file(r).exists()]
        raise DataError(
            str(path),
            None,
            None,
            f"round {iteration} has no teacher predictions to pseudo-label from; rounds that "
            f"have: {', '.join(map(str, rounds)) or 'none yet'}",
        )
    return read_table(schema.PREDICTIONS, path)


def round_pseudo_labels(
    run: RunDir, cfg: ExperimentConfig, predictions: pa.Table, iteration: int
) -> pa.Table:
    """The τ-selected pseudo-labels (with their scores) of round ``iteration``, as the loop's
    ``steps.pseudo_label`` selects them from ``predictions`` with ``cfg``; nothing is written."""
    images = run.read_images()
    predicted = pc.unique(predictions["image_id"].combine_chunks())
    candidates = images.filter(pc.is_in(images["image_id"], value_set=predicted))
    captured: list[pa.Table] = []

    def capture(kept: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        captured.append(kept)
        return kept, {}

    pool = PoolState.load(run)
    steps.pseudo_label(run, cfg, pool, predictions, candidates, iteration, refine=capture)
    return captured[0]


def pls_analysis(
    run: RunDir, cfg: ExperimentConfig, iteration: int = 1, tag: str | None = None
) -> PlsAnalysis:
    """Analyse the pseudo-labels of round ``iteration`` of the SSL run ``run`` against the
    pool's ground truth and write the outputs (module docstring).

    Args:
        run: a run of ``loop: ssl``.
        cfg: δ_S (``ssl.pls_tau`` or ``ssl.tau``) and β (``ssl.pls_beta``) of S, C, D.
        iteration: the round (1: the teacher's pseudo-labels of the student).
        tag: the output folder under ``RUN/pls/`` (default ``round_<iteration>``).

    Raises:
        DataError: a malformed or used tag, not an SSL run, a round without predictions or
            pseudo-labels, or a pool without ground truth.
    """
    tag = tag or f"round_{iteration}"
    out = _target(run, tag)
    run_cfg = _ssl_config(run)
    predictions = _round_predictions(run, iteration)
    pseudo = round_pseudo_labels(run, run_cfg, predictions, iteration)
    if pseudo.num_rows == 0:
        raise DataError(
            str(run.predictions_file(iteration)),
            None,
            "score",
            f"round {iteration} selects no pseudo-label ({run_cfg.ssl.selection_strategy.name}, "
            f"tau {run_cfg.ssl.tau}): nothing to analyse",
        )
    gt = pool_gt(run, "detloop pls (the oracle analysis)")
    stored = steps.pseudo_rows(run.read_labels(), iteration)
    trained = {str(i) for i in stored["image_id"].to_pylist()}
    ssl = cfg.ssl
    table = pls_oracle_table(
        predictions,
        pseudo,
        gt,
        tau=ssl.pls_delta,
        beta=ssl.pls_beta,
        iteration=iteration,
        trained=trained,
    )
    report = {
        "run": run.name,
        "round": iteration,
        "tag": tag,
        "tau_s": ssl.pls_delta,
        "beta": ssl.pls_beta,
        "selection": run_cfg.ssl.selection_strategy.name,
        "selection_tau": run_cfg.ssl.tau,
        "run_pls": run_cfg.ssl.pls,
        "run_oracle_variant": run_cfg.ssl.oracle_variant,
        "trained_images": int(pc.sum(table["trained"]).as_py() or 0),
        **pls_oracle_report(table),
    }
    _write(run, out, table, report)
    return PlsAnalysis(out, table, report)


def _write(run: RunDir, out: Path, table: pa.Table, report: dict[str, Any]) -> None:
    """Write the outputs into a staging folder, then move it to ``out`` in one step."""
    run.pls_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=run.pls_root))
    try:
        write_table(table, schema.PLS_ANALYSIS, staging / TABLE_FILE)
        write_json(report, staging / REPORT_FILE)
        rate = table["missing_rate"].to_numpy()
        pls_roc_plot(signal_values(table), rate, MISSING_LEVELS, staging / ROC_FILE)
        if out.exists():  # another analysis of this tag finished meanwhile
            raise DataError(str(out), None, None, "the PLS analysis appeared meanwhile")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
