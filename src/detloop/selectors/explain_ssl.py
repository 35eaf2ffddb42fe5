"""``detloop explain-strategy --kind selection|teacher``: the stages an SSL pseudo-label
selection (``ssl.selection_strategy``, ALGORITHMS §11.2) or a teacher strategy
(``ssl.teacher_strategy``, §11.3, §11.4) turns on, one line each."""

from __future__ import annotations

from detloop.selectors.pseudo import PseudoSpec, TeacherSpec

_SCORES = {
    "score": "class score > τ",
    "combo": "class score > τ and u < δ̄, the mean of the teacher's cost-sensitive thresholds (§7)",
    "alluncert": (
        "class score > τ and certainty > τ, certainty = min-max(1/mean(rel(mc), rel(al), mc_class))"
    ),
    "epuncert": "class score > τ; certainty = min-max(1/mean(rel(mc), mc_class))",
    "ental": "class score > τ; certainty = min-max(1/mean(rel(al), entropy))",
    "pcorrect": (
        "P(right) > τ, P = a logistic regression on (logit score, entropy, mc_class, log rel(al), "
        "log rel(mc), log size) fitted on the labeling model's validation detections"
    ),
}


def explain_selection(spec: PseudoSpec) -> list[str]:
    """One line per stage of a pseudo-label selection."""
    lines = [f"canonical name: {spec.name}"]
    rule = _SCORES.get(spec.score, f"the predictions column {spec.score!r} > τ")
    lines.append(f"keep a teacher detection when: {rule}")
    if spec.calib or spec.score.endswith("_cal"):
        lines.append("columns: calibrated on validation (*_cal) before the selection")
    if spec.norm:
        lines.append("box uncertainties relative to the box size")
    if spec.pseudoscore:
        lines.append("each pseudo-label weighs its certainty in the student's loss (§11.2)")
    else:
        lines.append("every pseudo-label weighs 1 in the student's loss")
    if spec.selftrain:
        lines.append("then `ssl.selftrain_rounds` self-training rounds, each from the last student")
    return lines


def explain_teacher(spec: TeacherSpec) -> list[str]:
    """One line per building block of a teacher strategy (empty name: plain STAC)."""
    lines = [f"canonical name: {spec.name or '(none: plain STAC)'}"]
    if spec.rcc:
        opts = [
            name
            for name, on in (
                ("each crop as a 2x2 of copies scaled 0.75 and 0.25", spec.rcc_scale),
                ("one random manual augmentation per crop", spec.rcc_manual_augmentations),
                ("whole rare-class images instead of collages", spec.rcc_full_im),
            )
            if on
        ]
        lines.append(
            "rcc: rare-class collages from the labeled images join the labeled part once, "
            "before the teacher trains (ssl.rcc_classes, else the ssl.rcc_k rarest classes)"
            + (f"; {', '.join(opts)}" if opts else "")
        )
    if spec.curriculum:
        aug = " + 2 RandAugment-ed rare images" if spec.curriculum_aug else ""
        lines.append(
            "curriculum_learning: the top ⌊N/B⌋ labeled images by mean RCF class weight are "
            f"rare; each batch is B - 1 common + 1 rare{aug} (the student's labeled part: "
            "L - 1 common + 1 rare)"
        )
    if spec.curriculum_pseudo:
        lines.append("curr: the same rare/common split and batches for the pseudo-labeled part")
    if spec.imscore:
        lines.append(
            "imscore: each labeled object weighs its RCF class weight (1/ln n_c scaled to "
            "[ssl.rcf_lowest, ssl.rcf_highest]) in the loss"
        )
    return lines
