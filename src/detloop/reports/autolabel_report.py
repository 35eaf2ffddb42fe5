"""What a person reads after auto-labeling: how many frames were auto-labeled, how many go to
review, how good the auto-labels are where ground truth exists, and where the files are."""

from __future__ import annotations

from detloop.data.rundir import RunDir


def autolabel_iteration(run: RunDir) -> int | None:
    """The last iteration of ``run`` that auto-labeled (logged), if any."""
    meta = run.read_meta()
    logged = sorted(
        h["iteration"] for h in meta.get("history", []) if h["phase"] == "log" and h.get("ended")
    )
    for it in reversed(logged):
        if "autolabel_frames" in run.read_metrics(it):
            return int(it)
    return None


def autolabel_summary(run: RunDir, iteration: int) -> str:
    """A few lines: shares, δ̄, quality against ground truth (beside the score rule at the
    same share), and the exported files."""
    m = run.read_metrics(iteration)
    n = int(m["autolabel_frames"])
    auto, examine = int(m["autolabel_auto_labeled"]), int(m["autolabel_examine"])
    lines = [
        f"auto-labeling with the model of iteration {iteration - 1}: {n} frames",
        f"  auto-labeled {auto} ({100 * auto / max(n, 1):.1f} %, "
        f"{int(m['autolabel_auto_labels'])} boxes), to review {examine}, "
        f"delta {m.get('autolabel_delta', float('nan')):.4g}",
    ]
    if "autolabel_image_precision" in m:
        lines.append(
            f"  image precision of the auto-labels {m['autolabel_image_precision']:.3f} "
            f"(a plain score threshold at the same share: "
            f"{m['autolabel_score_rule_image_precision']:.3f}); label precision "
            f"{m['autolabel_label_precision']:.3f}, recall {m['autolabel_label_recall']:.3f}"
        )
    if "autolabel_share_at_95" in m:
        lines.append(
            f"  share of the frames a threshold could auto-label at >= 95 % image precision "
            f"(chosen in hindsight on the ground truth): {100 * m['autolabel_share_at_95']:.1f} %"
        )
    lines += [f"  {f}" for f in run.autolabel_exports(iteration)]
    return "\n".join(lines)


def model_line(run: RunDir, iteration: int = 0) -> str | None:
    """The validation mAP of an auto-labeling run's model, when it was evaluated."""
    m = run.read_metrics(iteration)
    if "map" not in m:
        return None
    return f"model on this validation split: mAP {m['map']:.4f}, mAP50 {m['map50']:.4f}"
