"""Verbs ``train``, ``predict`` and ``evaluate`` (ARCHITECTURE §8): one model, one run directory.

``detloop train|predict|evaluate CONFIG --run RUN_DIR [--iteration N | --checkpoint PATH]``;
outputs go into the run directory (checkpoint, predictions tables, metrics.json, eval/ curves).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from detloop.cli.common import UsageError, add_set_option
from detloop.config import ExperimentConfig, load_config
from detloop.data import schema
from detloop.data.ids import strip_extension
from detloop.data.io import read_json, write_json, write_table
from detloop.data.min_score import resolve_min_score
from detloop.data.rundir import RunDir, iteration_of

if TYPE_CHECKING:
    from detloop.learners.predict import Predictor

log = logging.getLogger(__name__)
TRAINED_STATES = ("labeled", "pseudo", "auto_labeled")


def _out(text: str) -> None:
    print(text)  # noqa: T201 - command output


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML")
    p.add_argument("--run", required=True, type=Path, help="run directory (data imported)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, help="iteration whose checkpoint/outputs to use")
    which.add_argument("--checkpoint", type=Path, help="checkpoint directory or weights file")
    add_set_option(p)


def register(sub: Any) -> None:
    """Add the learner verbs to the ``detloop`` command line."""
    p = sub.add_parser("train", help="train a detector on the run's labeled images")
    _common(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("predict", help="predict a split or an image folder into the run")
    _common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=list(schema.SPLITS), help="split of the run (default pool)")
    src.add_argument("--images", type=Path, help="a folder of images instead of a split")
    p.add_argument("--out", type=Path, help="predictions file (default: in the run directory)")
    p.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="also draw the detections to PNGs (and, with predict.infer_draw_uncert, one more "
        "per uncertainty under DIR/uncertainty/)",
    )
    p.add_argument("--first", type=int, metavar="N", help="first image (sorted ids), inclusive")
    p.add_argument("--last", type=int, metavar="M", help="last image, exclusive")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("evaluate", help="COCO mAP, per-class AP and curves of a checkpoint")
    _common(p)
    p.add_argument("--split", choices=list(schema.SPLITS), default="val")
    p.set_defaults(func=cmd_evaluate)


def _load(args: argparse.Namespace) -> tuple[ExperimentConfig, RunDir]:
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.run)
    if not run.images_file.exists():
        raise UsageError(
            f"{run.path}: no imported data; run `detloop import ... --run {run.path}` first"
        )
    return cfg, run


def _num_classes(run: RunDir) -> int:
    cats = run.read_categories()
    if cats.num_rows == 0:
        raise UsageError(f"{run.categories_file}: no categories; import a labeled split first")
    return int(pc.max(cats.column("class_id")).as_py()) + 1


def _with_weight(gt: pa.Table) -> pa.Table:
    return gt.append_column("weight", pa.array([1.0] * gt.num_rows, pa.float32()))


def training_set(run: RunDir) -> tuple[pa.Table, pa.Table]:
    """Pool images with training labels: the labels table, or the pool's gt when it is empty."""
    images = run.read_images()
    pool = images.filter(pc.equal(images.column("split"), "pool"))
    labels = run.read_labels()
    if labels.num_rows == 0:
        log.info("no labels yet: training on the ground truth of the whole pool")
        pool = pool.filter(pc.invert(pc.equal(pool.column("state"), "examine")))
        gt = run.read_gt()
        return pool, _with_weight(
            gt.filter(pc.is_in(gt.column("image_id"), pool.column("image_id")))
        )
    used = pc.or_(
        pc.is_in(pool.column("image_id"), labels.column("image_id")),
        pc.is_in(pool.column("state"), pa.array(TRAINED_STATES)),
    )
    return pool.filter(used), labels


def split_set(run: RunDir, split: str) -> tuple[pa.Table, pa.Table]:
    """Readable images of ``split`` and their ground truth."""
    images = run.read_images()
    sel = images.filter(pc.equal(images.column("split"), split))
    sel = sel.filter(pc.is_null(sel.column("reason")))
    gt = run.read_gt()
    return sel, gt.filter(pc.is_in(gt.column("image_id"), sel.column("image_id")))


def cmd_train(args: argparse.Namespace) -> int:
    from detloop.learners.train import train_model

    cfg, run = _load(args)
    images, labels = training_set(run)
    if images.num_rows == 0:
        raise UsageError(f"{run.path}: no labeled pool images to train on")
    val = split_set(run, "val") if cfg.train.early_stopping else None
    out = args.checkpoint or run.checkpoint(args.iteration or 0)
    result = train_model(cfg, images, labels, _num_classes(run), out, seed=cfg.seed, val=val,
                         class_names=run.class_names())  # fmt: skip
    _out(f"trained {result.steps} steps on {images.num_rows} images in {result.seconds:.1f} s")
    _out(f"final loss {result.final_loss:.4f}; checkpoint {result.checkpoint}")
    return 0


def _checkpoint(args: argparse.Namespace, run: RunDir) -> tuple[Path, int]:
    if args.checkpoint is not None:
        return args.checkpoint, iteration_of(args.checkpoint) or 0
    if args.iteration is not None:
        path = run.checkpoint(args.iteration)
        if not path.exists():
            raise UsageError(f"{path}: no checkpoint for iteration {args.iteration}")
        return path, args.iteration
    latest = run.latest_checkpoint()
    if latest is None:
        raise UsageError(f"{run.path}: no checkpoint yet; run `detloop train` first")
    return latest, iteration_of(latest) or 0


def folder_images(folder: Path) -> pa.Table:
    """An images table (id = relative path without extension) of every image under ``folder``."""
    from detloop.data.images import find_images, header_size

    if not folder.is_dir():
        raise UsageError(f"{folder}: not a directory")
    files = find_images(folder)
    sizes = [header_size(f) for f in files]
    return pa.table(
        {
            "image_id": [strip_extension(f.relative_to(folder).as_posix()) for f in files],
            "file": [str(f.resolve()) for f in files],
            "width": pa.array([s[0] for s in sizes], pa.int32()),
            "height": pa.array([s[1] for s in sizes], pa.int32()),
        }
    )


def frame_range(images: pa.Table, first: int | None, last: int | None) -> pa.Table:
    """The images [first, last) in image-id order (all of them when neither is given).

    Raises:
        UsageError: an empty or inverted range.
    """
    if first is None and last is None:
        return images
    if first is not None and last is not None and last <= first:
        raise UsageError(f"--last ({last}) must be greater than --first ({first})")
    ids = sorted(images.column("image_id").to_pylist())[first:last]
    if not ids:
        raise UsageError(f"no images in [{first}, {last}) of {images.num_rows}")
    keep = pc.is_in(images.column("image_id"), value_set=pa.array(ids, pa.string()))
    return images.filter(keep).sort_by("image_id")


def load_predictor(ckpt: Path, cfg: ExperimentConfig, run: RunDir) -> Predictor:
    """A checkpoint directory (its own architecture) or a bare weights file (the config's)."""
    from detloop.learners.predict import Predictor

    if ckpt.is_file():
        return Predictor.from_state(ckpt.read_bytes(), cfg, _num_classes(run))
    return Predictor.from_checkpoint(ckpt, cfg, class_names=run.class_names())


def cmd_predict(args: argparse.Namespace) -> int:
    from detloop.learners.render import render_predictions

    cfg, run = _load(args)
    ckpt, iteration = _checkpoint(args, run)
    if args.images is not None:
        images, name = folder_images(args.images), "images"
    else:
        name = args.split or "pool"
        images = split_set(run, name)[0]
    images = frame_range(images, args.first, args.last)
    predictor = load_predictor(ckpt, cfg, run)
    table = predictor.predict(images, seed=cfg.seed, progress=True)
    path = args.out or run.split_predictions_file(iteration, name)
    write_table(table, schema.PREDICTIONS, path)
    _out(
        f"{table.num_rows} detections on {images.num_rows} images "
        f"in {predictor.seconds:.1f} s -> {path}"
    )
    if predictor.stats:
        _out(f"decoding bounds: {predictor.stats.describe()}")
    if args.render is not None:
        names = run.read_categories().column("name").to_pylist()
        min_score = resolve_min_score(cfg.predict.min_score)
        files = render_predictions(
            table,
            images,
            args.render,
            min_score=min_score,
            class_names=names,
            draw_uncert=cfg.predict.infer_draw_uncert,
            per_uncertainty=cfg.predict.infer_draw_uncert,
        )
        _out(f"rendered {len(files)} images into {args.render}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detloop.learners.evaluate_run import evaluate_predictions

    cfg, run = _load(args)
    ckpt, iteration = _checkpoint(args, run)
    images, gt = split_set(run, args.split)
    if gt.num_rows == 0:
        raise UsageError(
            f"{run.path}: split {args.split!r} has no ground truth to evaluate against"
        )
    predictor = load_predictor(ckpt, cfg, run)
    table = predictor.predict(images, seed=cfg.seed, progress=True)
    predictor.log_stats(f"evaluate {args.split}")
    write_table(table, schema.PREDICTIONS, run.split_predictions_file(iteration, args.split))
    categories = run.read_categories()
    metrics = evaluate_predictions(table, gt, images, categories)
    path = run.metrics_file(iteration)
    stored = read_json(path) if path.exists() else {}
    stored = stored if isinstance(stored, dict) else {}
    stored[f"evaluate_{args.split}"] = {k: (None if v != v else v) for k, v in metrics.items()}
    write_json(stored, path)
    for key in ("map", "map50", "map75"):
        _out(f"{key:>8}: {metrics.get(key, float('nan')):.4f}")
    for key, value in sorted(metrics.items()):
        if key.startswith("ap/"):
            _out(f"{key:>8}: {value:.4f}")  # nan: class without ground truth
    _write_curves(run, iteration, args.split, (table, gt, images, categories))
    return 0


def _write_curves(
    run: RunDir, iteration: int, split: str, tables: tuple[pa.Table, pa.Table, pa.Table, pa.Table]
) -> None:
    """Extra curves of §4 (AP vs IoU, confusion, P/R/F1, ROC, mIoU): JSON and PNGs in eval/."""
    from detloop.learners.eval_curves import curves_report
    from detloop.reports.eval_plots import write_eval_plots

    report = curves_report(*tables)
    out = run.eval_dir(iteration)
    write_json(report, run.curves_file(iteration, split))
    plots = write_eval_plots(report, out, prefix=f"{split}_")
    _out(f"curves: {split}_curves.json and {len(plots)} plots in {out}")
