"""``detloop export-model RUN --iteration N --out DIR [--format bundle|onnx|torchscript]``.

``bundle`` (the default): the model with its classes, calibrators, thresholds, config and a
manifest, for reuse on another dataset (``detloop.learners.bundle``; ``--checkpoint DIR`` or
``model.weights: DIR``, ``model.class_map`` for renamed classes).

``onnx`` / ``torchscript``: the detector in a serving format (``detloop.learners.export``),
with what a server needs beside it: ``anchors.npy`` (yxyx network pixels, effdet's anchor
order), ``model_spec.json``, ``classes.json`` and ``manifest.json`` (versions, preprocessing,
outputs, sizes and sha256 of every file). ``--check`` runs the exported file on real images
of the run beside torch and records the largest difference and both timings in the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError
from detloop.data.rundir import RunDir


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cmd_export_model(args: argparse.Namespace) -> int:
    import numpy as np

    from detloop.data.dataset import IMAGENET_MEAN, IMAGENET_STD
    from detloop.learners import export
    from detloop.learners.checkpoint import model_from_checkpoint
    from detloop.learners.loss import make_anchors

    run = RunDir(args.run_dir)
    if not run.run_json.exists() and not run.images_file.exists():
        raise UsageError(f"{run.path} is not a run directory")
    ckpt = run.checkpoint(args.iteration)
    if not (ckpt / "metadata.json").exists():
        raise UsageError(f"{ckpt}: no checkpoint for iteration {args.iteration}")
    model, meta = model_from_checkpoint(ckpt)
    out: Path = args.out
    if args.format == "bundle":
        return _bundle(run, args.iteration, out, meta)
    path = export.export(model, args.format, out)
    anchors = make_anchors(model.spec).boxes.numpy().astype(np.float32)
    np.save(out / "anchors.npy", anchors)
    (out / "model_spec.json").write_text(json.dumps(model.spec.to_json(), indent=1))
    names = run.read_categories().column("name").to_pylist() if run.categories_file.exists() else []
    (out / "classes.json").write_text(json.dumps(names, indent=1))
    h, w = model.spec.image_size
    info: dict[str, Any] = {
        "format": f"detloop-{args.format}",
        "version": 1,
        "model_file": path.name,
        "source": {"run": run.name, "iteration": args.iteration, "steps": meta.get("steps")},
        "versions": {p: _version(p) for p in ("detloop", "torch", "effdet", "onnx")},
        "input": {
            "name": "image",
            "shape": ["batch", 3, h, w],
            "preprocessing": "RGB / 255, minus ImageNet mean, over ImageNet std; resized by "
            "min(H/h, W/w) and padded at the bottom and right to H x W",
            "mean": IMAGENET_MEAN.tolist(),
            "std": IMAGENET_STD.tolist(),
        },
        "outputs": {
            "class_logits": ["batch", len(anchors), model.spec.num_classes],
            "box_deltas": ["batch", len(anchors), 4],
            "box_log_var": ["batch", len(anchors), 4],
        },
        "anchors": "anchors.npy: yxyx network pixels, one row per output row",
        "post_processing": "detloop.learners.export.predictions_from_outputs",
    }
    if args.check:
        info["check"] = _check(run, model, path, args.format, args.check_images)
        c = info["check"]
        times = f"{args.format} {c['served_s']:.3f} s, torch {c['torch_s']:.3f} s per batch"
        _out(f"check on {c['images']} images: max |diff| {c['max_abs_diff']:.2e}; {times}")
    export.write_manifest(out, info)
    _out(f"exported iteration {args.iteration} of {run.name} as {args.format}: {path}")
    return 0


def fits_iteration(run: RunDir, model_iteration: int) -> int | None:
    """The iteration holding the thresholds (and calibrators) fitted for the model of
    ``model_iteration``: its own (``detloop calibrate|threshold --iteration N``), or the next
    one (a loop's iteration i calibrates and thresholds M(i-1)); None when neither does."""
    for it in (model_iteration, model_iteration + 1):
        th = run.read_metrics(it).get("thresholding", {})
        model = th.get("model_iteration", model_iteration if it == model_iteration else None)
        if model == model_iteration and run.thresholds_file(it).is_file():
            return it
    return None


def _bundle(run: RunDir, iteration: int, out: Path, meta: dict[str, Any]) -> int:
    from detloop.learners.bundle import write_bundle

    classes = run.class_names()
    if not classes:
        raise UsageError(f"{run.path}: no categories (import data first)")
    fits = fits_iteration(run, iteration)
    metrics = run.read_metrics(iteration)
    fitted = run.read_metrics(fits).get("thresholding", {}) if fits is not None else {}
    min_score = fitted.get("min_score", metrics.get("validation", {}).get("min_score"))
    config = run.read_meta().get("config") if run.run_json.exists() else None
    calibration = run.calibration_dir(fits) if fits is not None else None
    thresholds = run.thresholds_file(fits) if fits is not None else None
    info = {
        "source": {
            "run": run.name,
            "iteration": iteration,
            "steps": meta.get("steps"),
            "fits_iteration": fits,
        },
        "versions": {p: _version(p) for p in ("detloop", "torch", "effdet")},
        "min_score": min_score,
        "calibrated": calibration is not None and calibration.is_dir(),
        "thresholds": thresholds is not None,
    }
    write_bundle(
        run.checkpoint(iteration), out, classes, calibration=calibration,
        thresholds=thresholds, config=config, info=info,
    )  # fmt: skip
    extras = [k for k in ("calibrated", "thresholds") if info[k]]
    _out(f"bundle of iteration {iteration} of {run.name} ({len(classes)} classes"
         f"{', ' + ', '.join(extras) if extras else ''}): {out}")  # fmt: skip
    return 0


def _check(run: RunDir, model: Any, path: Path, fmt: str, n_images: int) -> dict[str, Any]:
    """Outputs of the exported file vs torch on up to ``n_images`` images of the run."""
    import numpy as np
    import pyarrow.compute as pc

    from detloop.data.dataset import DetectionDataset, collate
    from detloop.learners import export

    images = run.read_images()
    val = images.filter(pc.equal(images["split"], "val"))
    images = (val if val.num_rows else images).slice(0, n_images)
    if images.num_rows == 0:
        raise UsageError(f"{run.path}: no images to check the export on")
    data = DetectionDataset(images, None, model.spec.image_size)
    batch = collate([data[i] for i in range(len(data))])["image"].numpy()
    runner = export.run_onnx if fmt == "onnx" else export.run_torchscript

    def served() -> tuple[np.ndarray, ...]:
        return runner(path, batch)

    def ref() -> tuple[np.ndarray, ...]:
        return export.torch_outputs(model, batch)

    diff = max(float(np.abs(a - b).max()) for a, b in zip(served(), ref(), strict=True))
    return {
        "images": images.num_rows,
        "max_abs_diff": diff,
        "served_s": export.timed(served),
        "torch_s": export.timed(ref),
    }


def register(sub: Any) -> None:
    """``export-model``."""
    text = "export a trained model: a bundle for reuse, or ONNX / TorchScript for serving"
    p = sub.add_parser("export-model", help=text, description=text)
    p.add_argument("run_dir", type=Path, help="run directory")
    p.add_argument("--iteration", type=int, required=True, help="whose checkpoint to export")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=["bundle", "onnx", "torchscript"], default="bundle")
    p.add_argument("--check", action="store_true", help="compare with torch on real images")
    p.add_argument("--check-images", type=int, default=8, metavar="N")
    p.set_defaults(func=cmd_export_model)
