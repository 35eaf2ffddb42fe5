"""GLC — ground-truth label correction of a run's labeled set (ALGORITHMS §11.5) as a tool.

The teacher (the run's checkpoint of ``iteration``, default 0: the SSL teacher) predicts the
run's labeled pool images in consistency mode (``predict.consistency_ssl`` switched on for this
prediction only, §11.6); its detections with score ≥ 0.1 feed ``glc_correct`` with the labels
of those images (every source but ``pseudo``). RCC collages are left out: their boxes are
copies of their parents' boxes. With a stress seed the labels are first corrupted
(``corrupt_labels``: drop 20 %, move 20 %, add random boxes), GLC runs on the corrupted set and
``glc_recovery`` measures how much of the damage it undid.

Everything goes into NEW files under ``<run>/glc/<tag>/`` (the run's own tables are never
touched; a used tag is refused), written into a hidden sibling folder and renamed into place
whole:

- ``labels.parquet`` — the corrected label set (schema ``labels``; box ids after every box id
  of the run), ready to train a teacher on;
- ``provenance.parquet`` — per corrected box its ``rule`` (kept, md, noisy), ``gt_box_id``
  and ``det_id``; ``removed.parquet`` — the boxes ``mistakes`` removed;
- ``predictions.parquet`` — the teacher's predictions GLC used (with ``cons_iou``,
  ``cons_cls``);
- with a stress seed: ``corrupted_gt.parquet`` (schema ``gt``) and ``stress_changes.parquet``;
- ``report.json`` — counts, parameters and the recovery figures.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.collage import is_generated
from detloop.data.errors import DataError
from detloop.data.io import create_temp_dir, write_json, write_parquet, write_table
from detloop.data.labels import next_box_id
from detloop.data.rundir import RunDir
from detloop.orchestrator.evaluation.common import jsonable, resolve_model
from detloop.seeding import derive_seed
from detloop.selectors.ssl_glc import GlcParams, GlcResult, glc_correct
from detloop.selectors.ssl_glc_stress import StressParams, corrupt_labels, glc_recovery

logger = logging.getLogger(__name__)

GLC_MIN_SCORE: Final = 0.1  # the teacher's score floor for GLC (§11.5)
DEFAULT_PARAMS: Final = GlcParams()
DEFAULT_STRESS: Final = StressParams()
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: file name -> (table, its detloop schema, or None for an analysis table)
Tables = dict[str, tuple[pa.Table, schema.TableSpec | None]]


@dataclass(frozen=True)
class GlcReport:
    """What ``run_glc`` did: the tag, its folder, the result and ``report.json``'s content."""

    tag: str
    folder: Path
    result: GlcResult
    doc: dict[str, Any]

    def summary(self) -> str:
        """A few lines for a person: counts, then the recovery figures of a stress test."""
        c = self.doc["counts"]
        lines = [
            f"glc {self.tag}: {self.doc['n_images']} labeled images, {self.doc['n_input_boxes']} "
            f"boxes in, {self.doc['n_labels']} out (kept {c['kept']}, noisy {c['noisy']}, "
            f"md {c['md']} added, mistakes {c['mistakes']} removed) from "
            f"{self.doc['n_predictions']} teacher detections (score >= {self.doc['min_score']})"
        ]
        stress = self.doc.get("stress")
        if stress:
            rec = stress["recovery"]
            lines.append(f"stress seed {stress['seed']}: " + ", ".join(
                f"{k} {_fmt(k, v)}" for k, v in rec.items()))  # fmt: skip
        return "\n".join(lines)


def _fmt(key: str, value: Any) -> str:
    """A recovery figure: counts (``n_*``) whole, ratios to 3 decimals, n/a for none."""
    if value is None:
        return "n/a"
    return f"{value:.0f}" if key.startswith("n_") else f"{value:.3f}"


def default_tag(iteration: int, stress_seed: int | None) -> str:
    """``i<iteration>``, with ``-stress<seed>`` for a stress test."""
    return f"i{iteration}" + ("" if stress_seed is None else f"-stress{stress_seed}")


def labeled_set(run: RunDir) -> tuple[pa.Table, pa.Table]:
    """(images, labels) of the run's labeled pool images (RCC collages aside), labels of every
    source but ``pseudo``.

    Raises:
        DataError: the run has no labeled pool image.
    """
    images = run.read_images()
    mask = pc.and_(pc.equal(images["split"], "pool"), pc.equal(images["state"], "labeled"))
    images = images.filter(pc.and_(mask, pc.invert(is_generated(images["image_id"]))))
    if images.num_rows == 0:
        raise DataError(str(run.images_file), None, "state", "no labeled pool image to correct")
    labels = run.read_labels()
    keep = pc.and_(
        pc.is_in(labels["image_id"], value_set=images["image_id"].combine_chunks()),
        pc.invert(pc.fill_null(pc.equal(labels["source"], "pseudo"), False)),
    )
    return images.sort_by("image_id"), labels.filter(keep)


def teacher_predictions(
    run: RunDir, cfg: ExperimentConfig, iteration: int, images: pa.Table, min_score: float
) -> tuple[pa.Table, Path]:
    """The checkpoint of ``iteration`` on ``images`` in consistency mode, score ≥ min_score;
    and the checkpoint's path."""
    from detloop.learners.predict import Predictor

    ref = resolve_model(run, iteration, None)
    predict = cfg.predict.model_copy(update={"consistency_ssl": True})
    cfg = cfg.model_copy(update={"predict": predict})
    predictor = Predictor.from_checkpoint(ref.checkpoint, cfg, class_names=run.class_names())
    table = predictor.predict(images, seed=derive_seed(cfg.seed, iteration, "glc"))
    predictor.log_stats("glc teacher")
    return table.filter(pc.greater_equal(table["score"], min_score)), ref.checkpoint


def _check_tag(run: RunDir, tag: str) -> Path:
    """The output folder of ``tag``; a bad or used tag is refused (``DataError``)."""
    if not _TAG_RE.match(tag):
        raise DataError("glc", None, "tag", f"tag {tag!r} must match {_TAG_RE.pattern}")
    folder = run.glc_dir(tag)
    if folder.exists():
        raise DataError(str(folder), None, "tag", f"GLC tag {tag!r} exists already (never "
                        "overwritten); pass another --tag")  # fmt: skip
    return folder


def run_glc(
    run: RunDir,
    cfg: ExperimentConfig,
    *,
    iteration: int = 0,
    tag: str | None = None,
    stress_seed: int | None = None,
    params: GlcParams = DEFAULT_PARAMS,
    stress: StressParams = DEFAULT_STRESS,
    min_score: float = GLC_MIN_SCORE,
) -> GlcReport:
    """GLC on the labeled set of ``run`` with its teacher of ``iteration`` (module docstring).

    Args:
        cfg: the experiment config (model and prediction settings; ``seed``).
        iteration: whose checkpoint is the teacher (0: the SSL teacher).
        tag: the output folder under ``<run>/glc/`` (default ``default_tag``).
        stress_seed: corrupt the labels first with this seed and measure the recovery.
        params: the GLC rules and thresholds (§11.5 defaults).
        stress: the corruption (§11.5 defaults).
        min_score: the teacher's score floor (0.1).

    Returns:
        The report (also written as ``report.json``).

    Raises:
        DataError: a bad or used tag, no labeled image, no checkpoint of ``iteration``.
    """
    tag = tag or default_tag(iteration, stress_seed)
    folder = _check_tag(run, tag)
    images, labels = labeled_set(run)
    preds, checkpoint = teacher_predictions(run, cfg, iteration, images, min_score)
    doc: dict[str, Any] = {
        "tag": tag, "iteration": iteration, "checkpoint": _relative(checkpoint, run.path),
        "min_score": min_score, "n_images": images.num_rows, "n_predictions": preds.num_rows,
        "params": asdict(params),
    }  # fmt: skip
    tables: Tables = {"predictions.parquet": (preds, schema.PREDICTIONS)}
    gt, changes = labels, None
    if stress_seed is not None:
        gt, changes = corrupt_labels(labels, images, stress_seed, stress)
        tables |= {"corrupted_gt.parquet": (gt, schema.GT),
                   "stress_changes.parquet": (changes, None)}  # fmt: skip
    first = next_box_id(run.read_labels(), run.read_gt(), gt)  # no id of the run's reused
    result = glc_correct(gt, preds, params, first_box_id=first, iteration=iteration)
    if changes is not None:
        doc["stress"] = {"seed": stress_seed, "params": asdict(stress),
                         "n_original_boxes": labels.num_rows,
                         "recovery": glc_recovery(result, changes)}  # fmt: skip
    doc |= {"n_input_boxes": gt.num_rows, "n_labels": result.labels.num_rows,
            "counts": result.counts()}  # fmt: skip
    tables |= {"labels.parquet": (result.labels, schema.LABELS),
               "provenance.parquet": (result.provenance, None),
               "removed.parquet": (result.removed, None)}  # fmt: skip
    report = GlcReport(tag, folder, result, jsonable(doc))
    _write_folder(folder, tables, report.doc)
    logger.info("%s", report.summary())
    return report


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (no machine paths in the report)."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _write_folder(folder: Path, tables: Tables, doc: dict[str, Any]) -> None:
    """Write the tables and ``report.json`` into a hidden sibling, then rename it to
    ``folder``: a reader sees the whole set or nothing, and an existing folder is refused."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_dir(folder)
    try:
        for name, (table, spec) in tables.items():
            if spec is None:
                write_parquet(table, tmp / name)
            else:
                write_table(table, spec, tmp / name)
        write_json(doc, tmp / "report.json")
        if folder.exists():  # a concurrent run took the tag meanwhile
            raise DataError(str(folder), None, "tag", f"GLC tag {folder.name!r} exists already")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
