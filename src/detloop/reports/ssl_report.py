"""What a person reads when a semi-supervised run ends: one line per round (teacher, student,
self-training rounds) with the model's mAP and its pseudo-labels' count and quality, and under
it the round's pseudo-labels per class."""

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


def pseudo_figures(row: dict[str, float]) -> dict[str, float]:
    """The pseudo-labels a round's model trained on: ``pseudo_labels``, ``precision`` and
    ``recall`` against the hidden gt (simulated runs) — an online mean teacher's own labels
    (``train_online_*``, counted over all its steps) where it logged them, not the burn-in
    teacher's offline pick its pseudo_label phase scored."""
    out = {}
    for key in ("labels", "precision", "recall"):
        value = row.get(f"train_online_pseudo_{key}", row.get(f"pseudo_label_pseudo_{key}"))
        if value is not None:
            out["pseudo_labels" if key == "labels" else key] = float(value)
    return out


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
        pseudo = pseudo_figures(row)
        r = int(row["round"])
        name = "teacher" if r == 0 else "student" if r == 1 else f"selftrain{r - 1}"
        lines.append(
            f"{r:>5} {name:>10} {_fmt(row.get('map'), '.4f'):>7} "
            f"{_fmt(row.get('map50'), '.4f'):>7} {_fmt(row.get('test_map'), '.4f'):>8} "
            f"{_fmt(pseudo.get('pseudo_labels'), '.0f'):>7} "
            f"{_fmt(pseudo.get('precision'), '.3f'):>6} {_fmt(pseudo.get('recall'), '.3f'):>6}"
        )
        lines += _class_lines(run, r, row)
    return "\n".join(lines)


def _class_lines(run: RunDir, iteration: int, row: dict[str, float]) -> list[str]:
    """The round's pseudo-labels per class (``pseudo_classes.json``), rarest labeled class
    last — when they are the labels its model trained on (not an online teacher's round,
    whose own labels are only counted in all)."""
    table = run.read_pseudo_classes(iteration)
    if table is None or any(k.startswith("train_online_pseudo_") for k in row):
        return []
    rows = sorted(table, key=lambda c: (-c["labeled"], c["class_id"]))
    width = max([5, *(len(str(c["name"])) for c in rows)])
    out = [f"{'':>5} {'class':>{width}} {'labeled':>7} {'pseudo':>7} {'prec':>6} {'recall':>6}"]
    for c in rows:
        out.append(
            f"{'':>5} {c['name']:>{width}} {c['labeled']:>7} {c['pseudo']:>7} "
            f"{_fmt(c.get('precision'), '.3f'):>6} {_fmt(c.get('recall'), '.3f'):>6}"
        )
    return out
