"""Model bundles: a trained model with what it needs to be reused elsewhere — the reference's
"rename the class folders" trick made first class.

A bundle is a checkpoint directory (``model.pt`` + ``metadata.json``, so every ``--checkpoint``
and ``model.weights`` reads it) plus ``classes.json`` (class names in the model's class order),
the model's calibrators (``calibration/``) and thresholds (``thresholds.json``) when the run
fitted them, the run's ``config.json`` and a ``manifest.json`` (versions, source, min score,
size and sha256 of every file).

On another dataset the model's classes are matched to the run's categories by name, through
``model.class_map`` (run name → bundle name) where they differ: :func:`class_permutation` finds
each run class in the bundle and :func:`adapt_classes` re-orders (and cuts to the run's classes)
the rows of the class predict layer, so the adapted model predicts the run's class ids directly.
A run class with no bundle class is an error that lists the unmatched names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from detloop.data.errors import DataError
from detloop.learners.model import ModelSpec, UncertainEfficientDet

CLASSES_FILE = "classes.json"
MANIFEST = "manifest.json"
FORMAT = "detloop-bundle"


def bundle_classes(directory: Path) -> list[str] | None:
    """The class names a bundle (or any checkpoint directory with ``classes.json``) predicts."""
    path = Path(directory) / CLASSES_FILE
    if not path.is_file():
        return None
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(str(path), None, None, "expected a JSON list of class names")
    return names


def _matched(
    source: Sequence[str], target: Sequence[str], class_map: Mapping[str, str] | None
) -> list[tuple[str, str, int | None]]:
    """Each ``target`` (run) class with the model class it names (its own name or
    ``class_map[name]``) and that class's index in ``source`` (None: no such model class)."""
    index = {name: i for i, name in enumerate(source)}
    cmap = class_map or {}
    return [(t, cmap.get(t, t), index.get(cmap.get(t, t))) for t in target]


def _used_once(source: Sequence[str], rows: Sequence[int | None]) -> None:
    known = [r for r in rows if r is not None]
    if len(set(known)) != len(known):
        dup = sorted({source[r] for r in known if known.count(r) > 1})
        raise DataError("model.class_map", None, None, f"model class(es) used twice: {dup}")


def class_permutation(
    source: Sequence[str], target: Sequence[str], class_map: Mapping[str, str] | None = None
) -> list[int]:
    """For each ``target`` (run) class, the index of its ``source`` (bundle) class: its own name
    or ``class_map[name]``.

    Raises:
        DataError: run classes without a bundle class (all of them listed) or two run classes
            on one bundle class.
    """
    matched = _matched(source, target, class_map)
    missing = [t + (f" (mapped to {s})" if s != t else "") for t, s, i in matched if i is None]
    if missing:
        raise DataError(
            "model.class_map",
            None,
            None,
            f"run classes without a model class: {', '.join(missing)}; the model's classes are "
            f"{', '.join(source)} (map names with model.class_map: {{run name: model name}})",
        )
    perm = [i for _, _, i in matched if i is not None]
    _used_once(source, perm)
    return perm


CLASS_KEYS = (
    "class_net.predict.conv_pw.weight",
    "class_net.predict.conv_pw.bias",
    "class_net.predict.conv.weight",
    "class_net.predict.conv.bias",
)


def class_rows(
    source: Sequence[str], target: Sequence[str], class_map: Mapping[str, str] | None = None
) -> list[int | None]:
    """For training from a model of ``source`` classes on data of ``target`` classes: each
    target class's model class (its name, or ``class_map[name]``), None for a class the model
    does not know (its rows of the class layer start fresh).

    Raises:
        DataError: a ``class_map`` entry naming no model class, two run classes on one model
            class, or no class in common.
    """
    matched = _matched(source, target, class_map)
    cmap = class_map or {}
    wrong = [f"{t} -> {s}" for t, s, i in matched if i is None and t in cmap]
    if wrong:
        msg = f"mapped to no model class: {', '.join(wrong)}"
        raise DataError("model.class_map", None, None, f"{msg}; the model's: {', '.join(source)}")
    rows = [i for _, _, i in matched]
    _used_once(source, rows)
    if all(r is None for r in rows):
        msg = f"the model knows none of the run's classes ({', '.join(target)})"
        raise DataError("model.class_map", None, None, f"{msg}; map them with model.class_map")
    return rows


def _pick_rows(
    state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], rows: Sequence[int | None],
    num_anchors: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``state`` with the class layer cut to ``rows`` (indices into its classes; None: the row
    of ``fresh``, a newly initialised model of the target classes)."""
    out = dict(state)
    for key in CLASS_KEYS:
        if key not in state:
            continue
        src = state[key].reshape(num_anchors, -1, *state[key].shape[1:])  # anchor-major
        dst = fresh[key].reshape(num_anchors, len(rows), *fresh[key].shape[1:]).clone()
        for j, r in enumerate(rows):
            if r is not None:
                dst[:, j] = src[:, r]
        out[key] = dst.reshape(fresh[key].shape)
    return out


def adapt_classes(model: UncertainEfficientDet, perm: Sequence[int]) -> UncertainEfficientDet:
    """A copy of ``model`` predicting classes ``perm`` (indices into its own) in that order."""
    if list(perm) == list(range(model.spec.num_classes)):
        return model
    spec = ModelSpec.from_json({**model.spec.to_json(), "num_classes": len(perm)})
    adapted = UncertainEfficientDet(spec)
    fresh = adapted.state_dict()
    adapted.load_state_dict(_pick_rows(model.state_dict(), fresh, perm, model.num_anchors))
    return adapted.eval()


def load_with_classes(
    model: UncertainEfficientDet, state: dict[str, torch.Tensor], rows: Sequence[int | None]
) -> None:
    """Load a model's ``state`` into ``model`` (same architecture, ``len(rows)`` classes), its
    class layer rows picked by ``rows`` (:func:`class_rows`); new classes keep ``model``'s
    fresh rows.

    Raises:
        DataError: tensors that do not fit (another architecture).
    """
    merged = _pick_rows(state, model.state_dict(), rows, model.num_anchors)
    try:
        model.load_state_dict(merged, strict=True)
    except RuntimeError as exc:
        raise DataError(
            "model.weights", None, None, f"weights do not fit the model: {exc}"
        ) from None


def load_start_weights(
    model: UncertainEfficientDet,
    path: Path,
    kind: str,
    classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
) -> None:
    """``model.weights`` as a run's starting point: ``checkpoint.load_weights`` — except a model
    bundle whose classes (``classes.json``) differ from the data's ``classes`` (kind ``full``):
    every tensor but the class layer, whose rows follow the classes by name (``class_map``
    where names differ; classes the model does not know keep their fresh rows).

    Raises:
        DataError: missing file, weights that do not fit, classes that cannot be matched.
    """
    import logging

    from detloop.learners.checkpoint import load_state_dict, load_weights

    names = bundle_classes(Path(path)) if Path(path).is_dir() else None
    if kind != "full" or classes is None or names is None or names == list(classes):
        load_weights(model, Path(path), kind)
        return
    rows = class_rows(names, classes, class_map)
    load_with_classes(model, load_state_dict(Path(path)), rows)
    new = [c for c, r in zip(classes, rows, strict=True) if r is None]
    logging.getLogger(__name__).info(
        "loaded the model of %s: %d classes matched by name, new (fresh): %s",
        path, len(rows) - len(new), ", ".join(new) or "none",
    )  # fmt: skip


def write_bundle(
    checkpoint: Path,
    out: Path,
    classes: Sequence[str],
    *,
    calibration: Path | None = None,
    thresholds: Path | None = None,
    config: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the bundle of ``checkpoint`` into ``out`` (replacing an older bundle there)."""
    from detloop.learners.checkpoint import META_FILE, MODEL_FILE

    if not (checkpoint / META_FILE).is_file():
        raise DataError(str(checkpoint), None, None, "not a checkpoint directory")
    if out.exists():
        if not (out / MANIFEST).is_file():
            raise DataError(str(out), None, None, "exists and is not a bundle: not overwritten")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (MODEL_FILE, META_FILE):
        shutil.copy2(checkpoint / name, out / name)
    (out / CLASSES_FILE).write_text(json.dumps(list(classes), indent=1))
    if calibration is not None and calibration.is_dir():
        shutil.copytree(calibration, out / "calibration")
    if thresholds is not None and thresholds.is_file():
        shutil.copy2(thresholds, out / "thresholds.json")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    from detloop.data.io import file_digests

    files = file_digests(out, skip=MANIFEST)
    manifest = {"format": FORMAT, "version": 1, **(info or {}), "classes": list(classes),
                "files": files}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return out


def install_model(
    source: Path, out: Path, class_names: Sequence[str], class_map: Mapping[str, str] | None
) -> dict[str, Any]:
    """Write ``source`` (a checkpoint directory or bundle) into the checkpoint directory
    ``out`` as a model of ``class_names`` (re-ordered and cut through ``class_map`` when the
    source names its classes, else taken as they are when the counts agree); returns its
    ``model_spec`` as stored.

    Raises:
        DataError: not a checkpoint, a class without a model class, or class counts that differ
            when the source does not name its classes.
    """
    from detloop.learners.checkpoint import model_from_checkpoint, write_checkpoint

    if not (Path(source) / "metadata.json").is_file():
        raise DataError(str(source), None, None, "not a checkpoint directory (no metadata.json)")
    model, meta = model_from_checkpoint(Path(source))
    names = bundle_classes(Path(source))
    if names is not None:
        model = adapt_classes(model, class_permutation(names, class_names, class_map))
    elif model.spec.num_classes != len(class_names):
        raise DataError(str(source), None, None, f"the model predicts {model.spec.num_classes} "
                        f"classes, the data has {len(class_names)} (and the checkpoint has no "
                        "classes.json to match them by name)")  # fmt: skip
    spec = model.spec.to_json()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_checkpoint(out, state, {**meta, "model_spec": spec, "installed_from": str(source)})
    (Path(out) / CLASSES_FILE).write_text(json.dumps(list(class_names), indent=1))
    return spec
