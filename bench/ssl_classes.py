"""The SSL bench's per-class view: for each variant, the pseudo-labels its students got of each
class (mean count over seeds, precision and recall pooled over seeds at IoU 0.5 against the
hidden gt) beside the final model's test AP of that class — what shows a selection trading rare
classes' labels for common ones' (mAP weighs every class alike)."""

from __future__ import annotations

import math
from typing import Any

from benchkit import seed_stats

Records = dict[str, dict[int, dict[str, Any]]]


def _mean(values: list[float]) -> float:
    """The mean of the finite values (NaN when none), as every bench table averages seeds."""
    return seed_stats(values)["mean"]


def class_table(records: Records) -> dict[str, dict[str, dict[str, float]]]:
    """``{"teacher": {class: {"ap"}}, variant: {class: {"labeled", "pseudo", "precision",
    "recall", "ap"}}}`` from the records' first student round's ``classes`` and each final
    round's ``ap/<class>``; a variant without per-class tables (runs logged before them) only
    has ``ap``."""
    teacher: dict[int, dict[str, Any]] = {
        seed: rec["rounds"][0] for by_seed in records.values() for seed, rec in by_seed.items()
    }
    names = sorted({k.removeprefix("ap/") for t in teacher.values() for k in t if "ap/" in k})
    teacher_ap = {c: _mean([t.get(f"ap/{c}", math.nan) for t in teacher.values()]) for c in names}
    out: dict[str, dict[str, dict[str, float]]] = {
        "teacher": {c: {"ap": ap} for c, ap in teacher_ap.items()}
    }
    for variant, by_seed in records.items():
        table: dict[str, dict[str, float]] = {}
        firsts = [r for rec in by_seed.values() for r in rec.get("classes", {}).get("1", [])]
        for name in names:
            rows = [r for r in firsts if r["name"] == name]
            finals = [rec["rounds"][-1].get(f"ap/{name}", math.nan) for rec in by_seed.values()]
            entry = {"ap": _mean(finals)}
            if rows:
                pseudo = sum(r["pseudo"] for r in rows)
                matched = sum(r.get("matched", 0) for r in rows)
                gt = sum(r.get("gt", 0) for r in rows)
                scored = all("matched" in r for r in rows)
                entry.update(
                    labeled=_mean([float(r["labeled"]) for r in rows]),
                    pseudo=pseudo / len(rows),
                    precision=matched / pseudo if scored and pseudo else math.nan,
                    recall=matched / gt if scored and gt else math.nan,
                )
            table[name] = entry
        out[variant] = table
    return out


def class_table_text(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Classes as rows (most labeled first), per variant: pseudo-labels, precision, test AP."""
    variants = [v for v in table if v != "teacher"]
    any_rows = [table[v] for v in variants]

    def labeled(name: str) -> float:
        counts = [t[name]["labeled"] for t in any_rows if "labeled" in t.get(name, {})]
        return counts[0] if counts else math.nan

    def most_labeled_first(name: str) -> tuple[float, str]:
        n = labeled(name)
        return (-n if n == n else 0.0, name)

    names = sorted(table["teacher"], key=most_labeled_first)
    head = f"{'class':>6} {'labeled':>7} {'teacher AP':>10}" + "".join(
        f" | {v[:24]:>24}" for v in variants
    )
    lines = [
        "per class: pseudo-labels (mean over seeds), their precision (pooled), final test AP",
        head,
        f"{'':>6} {'':>7} {'':>10}" + f" | {'pseudo':>6} {'prec':>6} {'AP':>10}" * len(variants),
    ]

    def fmt(value: float, spec: str) -> str:
        return "-" if value != value else format(value, spec)

    for name in names:
        cells = "".join(
            f" | {fmt(table[v][name].get('pseudo', math.nan), '.0f'):>6}"
            f" {fmt(table[v][name].get('precision', math.nan), '.2f'):>6}"
            f" {fmt(table[v][name]['ap'], '.3f'):>10}"
            for v in variants
        )
        lines.append(
            f"{name:>6} {fmt(labeled(name), '.0f'):>7} "
            f"{fmt(table['teacher'][name]['ap'], '.3f'):>10}" + cells
        )
    return "\n".join(lines)
