"""What a person reads when a semi-supervised run ends: one line per round (teacher, student,
self-training rounds) with the model's mAP and its pseudo-labels' count and quality."""

from __future__ import annotations

import math

from detloop.data.io import read_json
from detloop.data.rundir import RunDir


def is_ssl_run(run: RunDir) -> bool:
    return run.read_meta().get("kind") == "ssl"


def round_rows(run: RunDir) -> list[dict[str, float]]:
    """The logged metrics of every finished round, in order."""
    rows = []
    for it in run.iterations():
        path = run.metrics_file(it)
        if path.exists():
            rows.append({"round": float(it), **read_json(path)})
    return rows


def _fmt(value: object, spec: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return format(value, spec)


def ssl_summary(run: RunDir) -> str:
    """A small text table of one SSL run: per round the model, val (and test) mAP, and the
    pseudo-labels it trained on with their precision and recall when the gt is known."""
    meta = run.read_meta()
    lines = [f"ssl {meta.get('strategy')} seed {meta.get('seed')}: {run.path}"]
    lines.append(
        f"{'round':>5} {'model':>10} {'mAP':>7} {'mAP50':>7} {'test mAP':>8} "
        f"{'pseudo':>7} {'prec':>6} {'recall':>6}"
    )
    for row in round_rows(run):
        # an online mean teacher's round: the labels the student was given, not the burn-in
        # teacher's offline pick its pseudo_label phase scored
        prec, rec = (
            row.get(f"train_online_pseudo_{k}", row.get(f"pseudo_label_pseudo_{k}"))
            for k in ("precision", "recall")
        )
        r = int(row["round"])
        name = "teacher" if r == 0 else "student" if r == 1 else f"selftrain{r - 1}"
        lines.append(
            f"{r:>5} {name:>10} {_fmt(row.get('map'), '.4f'):>7} "
            f"{_fmt(row.get('map50'), '.4f'):>7} {_fmt(row.get('test_map'), '.4f'):>8} "
            f"{_fmt(row.get('pseudo_label_pseudo_labels'), '.0f'):>7} "
            f"{_fmt(prec, '.3f'):>6} {_fmt(rec, '.3f'):>6}"
        )
    return "\n".join(lines)
