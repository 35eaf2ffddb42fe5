"""RCC — Rare Class Collage (ALGORITHMS §11.3): rare-class crops pasted into new labeled images.

Crops: for every labeled box of a target class, the box enlarged on each side by p·w (x) and p·h
(y), p ~ U(0.5, 1.0) drawn per box, clipped to the image. The crop keeps every labeled box with
at least one x-edge and one y-edge strictly inside it, clipped to it, if the clipped w and h are
> 2 px; a crop with ≥ 100 such boxes is skipped. The crops are shuffled (seeded) and pasted left
to right into collages of the original image size: each resized to the collage height (aspect
kept), a crop that would overflow squeezed to the remaining width, the last crop stretched to
fill; ≤ 100 boxes per collage; boxes rescaled with their crop. ``full_im`` writes the whole
rare-class images instead of collages.

How the rules read here (the geometry is pinned by tests/test_collage.py):

* Crop pixels are whole: the enlarged rectangle is widened to integers (floor of the low edges,
  ceil of the high ones) before clipping to the image, and the "strictly inside" test and the
  clipping use that integer rectangle, so boxes and crop pixels agree exactly.
* Collage size: the most common (width, height) of the images that gave crops (ties: the first
  by image id), one size for every collage.
* Natural width of a crop: ``max(1, round(w·H/h))``. A crop is squeezed when
  ``x + natural > W`` (it then ends the collage); the last crop of a collage that ends short of
  the width — no crops left, or the next crop's boxes would pass 100 — is stretched to
  ``W − x``. Every collage is therefore filled edge to edge.
* ≤ 100 boxes: a collage is closed before a crop whose boxes would pass the cap (the crop
  starts the next collage), so no pasted object is ever left unlabeled (the reference instead
  dropped the excess boxes of the crop). A crop with more boxes than the cap on its own (only
  possible with ``scale``, which quadruples them) is skipped and counted.
* ``manual_augmentations``: one of h-flip, brightness ×U(0.7, 1.3), contrast ×U(0.7, 1.3),
  Gaussian blur radius U(1, 3), additive noise of integers U[5, 20) per pixel and channel
  (clipped at 255), drawn uniformly per crop after its resize into the collage.
* ``scale``: see ``arrange_2x2``; it is applied after the manual augmentation.
* ``full_im``: each labeled image with a target-class box, whole, with all its labeled boxes
  (no crop rule, no 100 cap); ``manual_augmentations`` and ``scale`` act on it as on one crop.
* Default target classes: the k rarest classes among the labeled boxes (classes with no labeled
  box cannot give crops and are not counted; ties by class id).

One generator (``seeding.rng(seed, iteration, "rcc")``, compat seed 42) draws, in this order: p
per target box (images by id, boxes by box id), the crop shuffle, then the augmentations in
paste order. The RandAugment of the whole image before cropping (§11.3's fourth option) needs
the learners' augmentation and is not done here.

``run_rcc`` writes the images under ``<run>/generated/rcc/<tag>/NNNNNN.png`` and appends rows
(never replacing one): images in split ``pool``, state ``labeled``; their boxes as ``gt`` rows
and as ``labels`` rows with ``source = gt``, new box ids. The schema has no parent column and no
``rcc`` label source, so the provenance (parent image of every box and its box id there, the
parents of every image, the seed and the options) is the JSON sidecar ``provenance.json``
beside the images, and the image ids say what they are: ``pool/rcc/<tag>/NNNNNN``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageEnhance, ImageFilter

from detloop import seeding
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import atomic_path, write_json
from detloop.data.labels import box_rows, labels_from_boxes, next_box_id
from detloop.data.rundir import RunDir

log = logging.getLogger(__name__)

MAX_BOXES: Final = 100
MIN_SIDE: Final = 2.0  # a clipped box is kept when its w and h are greater
P_RANGE: Final = (0.5, 1.0)
COMPAT_SEED: Final = 42
AUGMENTATIONS: Final = ("hflip", "brightness", "contrast", "blur", "noise")
GENERATED_DIR: Final = "generated"
RCC_DIR: Final = "rcc"
PROVENANCE: Final = "provenance.json"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class RccOptions:
    """The RCC switches (all off by default) and its constants.

    Attributes:
        scale: replace each crop by its 2×2 arrangement of scaled copies (``arrange_2x2``).
        manual_augmentations: one random manual augmentation per crop (``augment``).
        full_im: whole rare-class images instead of collages.
        p_range: the enlargement factor's range, p ~ U(low, high).
        max_boxes: box cap of a crop (skipped at or above) and of a collage.
    """

    scale: bool = False
    manual_augmentations: bool = False
    full_im: bool = False
    p_range: tuple[float, float] = P_RANGE
    max_boxes: int = MAX_BOXES


@dataclass(frozen=True)
class Source:
    """A labeled image: its id, file and labeled boxes (absolute x1, y1, x2, y2)."""

    image_id: str
    file: str
    boxes: FloatArray
    class_ids: IntArray
    box_ids: IntArray


@dataclass(frozen=True)
class Patch:
    """An RGB image with boxes: a crop, a collage or a whole image.

    ``box_parent`` and ``parent_box_ids`` say where every box comes from (image id, box id);
    ``parents`` are the images the pixels come from, in paste order, each once.
    """

    image: Image.Image
    boxes: FloatArray
    class_ids: IntArray
    box_parent: tuple[str, ...]
    parent_box_ids: IntArray
    parents: tuple[str, ...]

    @property
    def n_boxes(self) -> int:
        return len(self.boxes)


class Slot(NamedTuple):
    """Where a crop goes in a collage: the crop's index, its left edge and width."""

    crop: int
    x: int
    width: int


DEFAULT_OPTIONS: Final = RccOptions()


# ---- crops ------------------------------------------------------------------------------------
def crop_rect(box: Sequence[float], p: float, width: int, height: int) -> Rect:
    """The box enlarged by p·w and p·h on each side, widened to whole pixels, clipped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dw, dh = p * (x2 - x1), p * (y2 - y1)
    return (
        max(0, math.floor(x1 - dw)),
        max(0, math.floor(y1 - dh)),
        min(width, math.ceil(x2 + dw)),
        min(height, math.ceil(y2 + dh)),
    )


def boxes_in_crop(rect: Rect, boxes: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    """Boxes with an x-edge and a y-edge strictly inside ``rect``, clipped to it, in crop
    coordinates, kept when w, h > 2 px; and their row indices in ``boxes``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx1, cy1, cx2, cy2 = rect

    def inside(v: FloatArray, lo: float, hi: float) -> npt.NDArray[np.bool_]:
        return (v > lo) & (v < hi)

    x_in = inside(b[:, 0], cx1, cx2) | inside(b[:, 2], cx1, cx2)
    y_in = inside(b[:, 1], cy1, cy2) | inside(b[:, 3], cy1, cy2)
    lo = np.array([cx1, cy1, cx1, cy1], dtype=np.float64)
    clipped = np.clip(b, [cx1, cy1, cx1, cy1], [cx2, cy2, cx2, cy2]) - lo
    big = (clipped[:, 2] - clipped[:, 0] > MIN_SIDE) & (clipped[:, 3] - clipped[:, 1] > MIN_SIDE)
    idx = np.flatnonzero(x_in & y_in & big).astype(np.int64)
    return clipped[idx], idx


def extract_crops(
    source: Source,
    image: Image.Image,
    targets: Sequence[int],
    rng: np.random.Generator,
    options: RccOptions = DEFAULT_OPTIONS,
) -> tuple[list[Patch], int]:
    """The crops around the target-class boxes of one image (box order); and how many were
    skipped for holding ``max_boxes`` boxes or more. One p is drawn per target box."""
    crops: list[Patch] = []
    skipped = 0
    low, high = options.p_range
    for k in np.flatnonzero(np.isin(source.class_ids, list(targets))).tolist():
        p = float(rng.uniform(low, high))
        rect = crop_rect(source.boxes[k], p, image.width, image.height)
        if rect[2] <= rect[0] or rect[3] <= rect[1]:  # a degenerate box outside the image
            continue
        boxes, idx = boxes_in_crop(rect, source.boxes)
        if len(idx) >= options.max_boxes:
            skipped += 1
            continue
        crops.append(
            Patch(
                image=image.crop(rect),
                boxes=boxes,
                class_ids=source.class_ids[idx],
                box_parent=(source.image_id,) * len(idx),
                parent_box_ids=source.box_ids[idx],
                parents=(source.image_id,),
            )
        )
    return crops, skipped


# ---- patch operations ---------------------------------------------------------------------------
def resized(patch: Patch, width: int, height: int) -> Patch:
    """The patch resized to ``width`` × ``height`` (Lanczos), its boxes scaled with it."""
    sx, sy = width / patch.image.width, height / patch.image.height
    image = patch.image.resize((width, height), Image.Resampling.LANCZOS)
    return _with(patch, image, patch.boxes * np.array([sx, sy, sx, sy]))


def _with(patch: Patch, image: Image.Image, boxes: FloatArray) -> Patch:
    return Patch(
        image, boxes, patch.class_ids, patch.box_parent, patch.parent_box_ids, patch.parents
    )


def paste(size: tuple[int, int], parts: Sequence[tuple[Patch, int, int]]) -> Patch:
    """A black ``size`` canvas with every patch pasted at its (x, y); boxes shifted, in order."""
    canvas = Image.new("RGB", size)
    for part, x, y in parts:
        canvas.paste(part.image, (x, y))
    shifted = [p.boxes + np.array([x, y, x, y], dtype=np.float64) for p, x, y in parts]
    parents = tuple(dict.fromkeys(s for p, _, _ in parts for s in p.parents))
    return Patch(
        image=canvas,
        boxes=np.concatenate([np.zeros((0, 4)), *shifted]),
        class_ids=np.concatenate([np.zeros(0, np.int64), *(p.class_ids for p, _, _ in parts)]),
        box_parent=tuple(s for p, _, _ in parts for s in p.box_parent),
        parent_box_ids=np.concatenate(
            [np.zeros(0, np.int64), *(p.parent_box_ids for p, _, _ in parts)]
        ),
        parents=parents,
    )


def arrange_2x2(patch: Patch) -> Patch:
    """``scale``: the patch replaced by a 2×2 arrangement of copies scaled 0.75 and 0.25.

    Read literally and filling the patch's own footprint (as the reference did): the grid's
    columns are 0.75 and 0.25 of the patch width (``a = round(0.75·W)``, ``W − a``) and its rows
    0.75 and 0.25 of its height; each cell holds a copy of the whole patch resized to the cell,
    so the copies are scaled (0.75, 0.75) top left, (0.25, 0.75) top right, (0.75, 0.25) bottom
    left and (0.25, 0.25) bottom right — the off-diagonal ones change the aspect ratio. Every
    box appears once per copy, scaled with it; a cell of zero width or height (a patch under
    2 px) holds no copy. The size of the patch is unchanged.
    """
    w, h = patch.image.size
    aw, ah = math.floor(0.75 * w + 0.5), math.floor(0.75 * h + 0.5)
    cells = [(0, 0, aw, ah), (aw, 0, w - aw, ah), (0, ah, aw, h - ah), (aw, ah, w - aw, h - ah)]
    parts = [(resized(patch, cw, ch), x, y) for x, y, cw, ch in cells if cw > 0 and ch > 0]
    return paste((w, h), parts)


def augment(patch: Patch, rng: np.random.Generator, op: str | None = None) -> tuple[Patch, str]:
    """``manual_augmentations``: one augmentation, drawn uniformly unless ``op`` names it."""
    if op is None:
        op = AUGMENTATIONS[int(rng.integers(len(AUGMENTATIONS)))]
    image = patch.image
    if op == "hflip":
        w = float(image.width)
        boxes = np.stack(
            [w - patch.boxes[:, 2], patch.boxes[:, 1], w - patch.boxes[:, 0], patch.boxes[:, 3]],
            axis=1,
        )
        return _with(patch, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), boxes), op
    if op == "brightness":
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
    elif op == "contrast":
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.3)))
    elif op == "blur":
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 3.0))))
    elif op == "noise":
        arr = np.asarray(image, dtype=np.int16)
        arr = arr + rng.integers(5, 20, size=arr.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    else:
        raise ValueError(f"unknown augmentation {op!r}; one of {', '.join(AUGMENTATIONS)}")
    return _with(patch, image, patch.boxes.copy()), op


def _finish(patch: Patch, rng: np.random.Generator, options: RccOptions) -> Patch:
    """The per-crop options, in order: manual augmentation, then the 2×2 arrangement."""
    if options.manual_augmentations:
        patch, _ = augment(patch, rng)
    return arrange_2x2(patch) if options.scale else patch


# ---- collages ---------------------------------------------------------------------------------
def natural_width(size: tuple[int, int], height: int) -> int:
    """Width of a ``size`` crop resized to ``height`` with its aspect kept (at least 1)."""
    w, h = size
    return max(1, math.floor(w * height / h + 0.5))


def pack(
    widths: Sequence[int], n_boxes: Sequence[int], canvas_width: int, max_boxes: int = MAX_BOXES
) -> list[list[Slot]]:
    """Crops (natural widths and box counts, in paste order) into collages of ``canvas_width``.

    Left to right; a crop that would overflow is squeezed to the remaining width and ends the
    collage; a collage that ends short of the width (no crops left, or the next crop's boxes
    would pass ``max_boxes``) has its last crop stretched to fill it. Every box count must be
    at most ``max_boxes``.
    """
    collages: list[list[Slot]] = []
    current: list[Slot] = []
    x = count = 0

    def close() -> None:
        nonlocal current, x, count
        if current:
            last = current[-1]
            current[-1] = Slot(last.crop, last.x, canvas_width - last.x)
            collages.append(current)
        current, x, count = [], 0, 0

    for i, (w, n) in enumerate(zip(widths, n_boxes, strict=True)):
        if n > max_boxes:
            raise ValueError(f"crop {i} has {n} boxes, more than the cap {max_boxes}")
        if current and count + n > max_boxes:
            close()
        current.append(Slot(i, x, min(w, canvas_width - x)))
        x, count = x + w, count + n
        if x >= canvas_width:
            close()
    close()
    return collages


def compose(
    crops: Sequence[Patch],
    slots: Sequence[Slot],
    canvas: tuple[int, int],
    rng: np.random.Generator,
    options: RccOptions = DEFAULT_OPTIONS,
) -> Patch:
    """One collage: every slot's crop resized to (slot width, canvas height), the options
    applied, pasted at the slot; boxes clipped to the canvas (float rounding only)."""
    height = canvas[1]
    parts = [
        (_finish(resized(crops[s.crop], s.width, height), rng, options), s.x, 0) for s in slots
    ]
    collage = paste(canvas, parts)
    boxes = np.clip(collage.boxes, 0.0, [canvas[0], height, canvas[0], height])
    return _with(collage, collage.image, boxes)


def make_collages(
    crops: Sequence[Patch],
    canvas: tuple[int, int],
    rng: np.random.Generator,
    options: RccOptions = DEFAULT_OPTIONS,
) -> tuple[list[Patch], int]:
    """Shuffle the crops and compose them into collages of ``canvas`` size; also how many crops
    were skipped for holding more than ``max_boxes`` boxes once ``scale`` quadrupled them."""
    order = rng.permutation(len(crops)).tolist()
    factor = 4 if options.scale else 1
    kept = [crops[i] for i in order if crops[i].n_boxes * factor <= options.max_boxes]
    widths = [natural_width(c.image.size, canvas[1]) for c in kept]
    counts = [c.n_boxes * factor for c in kept]
    collages = [
        compose(kept, slots, canvas, rng, options)
        for slots in pack(widths, counts, canvas[0], options.max_boxes)
    ]
    return collages, len(crops) - len(kept)


def full_image(source: Source, image: Image.Image) -> Patch:
    """``full_im``: the whole image with all its boxes."""
    n = len(source.boxes)
    return Patch(
        image=image,
        boxes=source.boxes.astype(np.float64).reshape(-1, 4),
        class_ids=source.class_ids,
        box_parent=(source.image_id,) * n,
        parent_box_ids=source.box_ids,
        parents=(source.image_id,),
    )


# ---- generation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RccOutput:
    """What ``generate`` made: the images, the crop counts and the collage size (None for
    ``full_im`` or when nothing was made)."""

    patches: list[Patch]
    n_crops: int
    n_skipped: int
    canvas: tuple[int, int] | None


def load_rgb(file: str) -> Image.Image:
    """An image file decoded as RGB."""
    with Image.open(file) as im:
        return im.convert("RGB")


def generate(
    sources: Sequence[Source],
    targets: Sequence[int],
    *,
    rng: np.random.Generator,
    options: RccOptions = DEFAULT_OPTIONS,
    load: Callable[[str], Image.Image] = load_rgb,
) -> RccOutput:
    """Collages (or with ``full_im`` whole images) of the target classes of ``sources``.

    Only images holding a target-class box are decoded. Sources are used in image-id order.
    """
    wanted = list(targets)
    crops: list[Patch] = []
    skipped = 0
    sizes: Counter[tuple[int, int]] = Counter()
    fulls: list[Patch] = []
    for source in sorted(sources, key=lambda s: s.image_id):
        if not np.isin(source.class_ids, wanted).any():
            continue
        image = load(source.file)
        if options.full_im:
            fulls.append(_finish(full_image(source, image), rng, options))
            continue
        found, n_skip = extract_crops(source, image, wanted, rng, options)
        crops += found
        skipped += n_skip
        if found:
            sizes[image.size] += 1
    if options.full_im:
        return RccOutput(fulls, len(fulls), 0, None)
    if not crops:
        return RccOutput([], 0, skipped, None)
    canvas = sizes.most_common(1)[0][0]
    collages, over_cap = make_collages(crops, canvas, rng, options)
    return RccOutput(collages, len(crops), skipped + over_cap, canvas)


def rarest_classes(class_ids: npt.ArrayLike, k: int = 2) -> list[int]:
    """The ``k`` classes with the fewest boxes among ``class_ids`` (ties: lower id first);
    classes without a box are not counted."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    counts = Counter(int(c) for c in np.asarray(class_ids).reshape(-1).tolist())
    return [c for c, _ in sorted(counts.items(), key=lambda cn: (cn[1], cn[0]))[:k]]


# ---- the run ----------------------------------------------------------------------------------
def generated_root(run: RunDir) -> Path:
    """The images root of generated images (image ids are ``pool/<path below it>``)."""
    return run.path / GENERATED_DIR


def rcc_dir(run: RunDir, tag: str) -> Path:
    """Where the RCC images of ``tag`` and their ``provenance.json`` are written."""
    return generated_root(run) / RCC_DIR / tag


def rcc_image_id(tag: str, n: int) -> str:
    return f"pool/{RCC_DIR}/{tag}/{n:06d}"


def is_generated(image_ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Mask of the image ids that RCC generated (never parents of new crops)."""
    return pc.starts_with(image_ids, f"pool/{RCC_DIR}/")


def labeled_sources(run: RunDir) -> list[Source]:
    """The labeled pool images of ``run`` with their labels (pseudo-labels aside), RCC images
    excluded; in image-id order."""
    images = run.read_images()
    mask = pc.and_(pc.equal(images["split"], "pool"), pc.equal(images["state"], "labeled"))
    images = images.filter(pc.and_(mask, pc.invert(is_generated(images["image_id"]))))
    labels = run.read_labels()
    labels = labels.filter(pc.invert(pc.fill_null(pc.equal(labels["source"], "pseudo"), False)))
    labels = labels.filter(pc.is_in(labels["image_id"], value_set=images["image_id"]))
    labels = labels.sort_by([("image_id", "ascending"), ("box_id", "ascending")])
    ids = labels["image_id"].to_numpy(zero_copy_only=False)
    xy = np.stack([labels[c].to_numpy() for c in schema.COORDS], axis=1).reshape(-1, 4)
    cls = labels["class_id"].to_numpy().astype(np.int64)
    bid = labels["box_id"].to_numpy().astype(np.int64)
    out: list[Source] = []
    for iid, file in sorted(
        zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True)
    ):
        rows = np.flatnonzero(ids == iid)
        out.append(Source(str(iid), str(file), xy[rows], cls[rows], bid[rows]))
    return out


@dataclass(frozen=True)
class RccRows:
    """The rows ``write_rcc`` appended, and the sidecar it wrote."""

    images: pa.Table
    gt: pa.Table
    labels: pa.Table
    provenance: Path | None


def _image_rows(
    ids: Sequence[str], files: Sequence[str], patches: Sequence[Patch], iteration: int | None
) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": pa.array(list(ids), pa.string()),
            "file": pa.array(list(files), pa.string()),
            "width": pa.array([p.image.width for p in patches], pa.int32()),
            "height": pa.array([p.image.height for p in patches], pa.int32()),
            "split": pa.array(["pool"] * n, pa.string()),
            "state": pa.array(["labeled"] * n, pa.string()),
            "iteration": pa.array([iteration] * n, pa.int32()),
            "phash": pa.nulls(n, pa.uint64()),
            "source_id": pa.nulls(n, pa.string()),
            "reason": pa.nulls(n, pa.string()),
        }
    )


def _provenance(
    ids: Sequence[str], patches: Sequence[Patch], gt: pa.Table, meta: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar: for every new image its parents, and for every box its parent box."""
    box_ids = gt["box_id"].to_numpy()
    items, start = [], 0
    for iid, patch in zip(ids, patches, strict=True):
        end = start + patch.n_boxes
        items.append(
            {
                "image_id": iid,
                "parents": list(patch.parents),
                "box_ids": box_ids[start:end].tolist(),
                "parent_image_ids": list(patch.box_parent),
                "parent_box_ids": patch.parent_box_ids.tolist(),
            }
        )
        start = end
    return {**meta, "images": items}


def write_rcc(
    run: RunDir,
    patches: Sequence[Patch],
    *,
    tag: str,
    iteration: int | None = None,
    meta: dict[str, Any] | None = None,
) -> RccRows:
    """Write ``patches`` as PNG files under ``rcc_dir(run, tag)`` and append their rows.

    Images (split pool, state labeled), gt rows and labels rows (source gt, weight 1) get new box
    ids after every existing one; ``provenance.json`` records the parents. Tables are written
    gt, labels, then images, so the images appear once everything else is stored; gt and labels
    rows of these ids left without an image by an interrupted write are dropped first.

    Raises:
        DataError: a bad tag, or image ids of this tag already in the run (nothing written).
    """
    if not _TAG_RE.match(tag):
        raise DataError("rcc", None, "tag", f"tag {tag!r} must match {_TAG_RE.pattern}")
    images, gt_all, labels_all = run.read_images(), run.read_gt(), run.read_labels()
    ids = [rcc_image_id(tag, n) for n in range(len(patches))]
    new_ids = pa.array(ids, pa.string())
    if pc.any(pc.is_in(images["image_id"], value_set=new_ids)).as_py():
        text = f"RCC images of tag {tag!r} are already in the run; pass another tag"
        raise DataError(str(run.images_file), None, "image_id", text)
    if not patches:
        return RccRows(schema.IMAGES.empty(), schema.GT.empty(), schema.LABELS.empty(), None)
    folder = rcc_dir(run, tag).resolve()
    files = [str(folder / f"{n:06d}.png") for n in range(len(patches))]
    for patch, file in zip(patches, files, strict=True):
        with atomic_path(file) as tmp:
            patch.image.save(tmp, format="PNG", compress_level=1)
    new_images = schema.validate_table(_image_rows(ids, files, patches, iteration), schema.IMAGES)
    new_gt = schema.validate_table(
        box_rows(
            [iid for iid, p in zip(ids, patches, strict=True) for _ in range(p.n_boxes)],
            np.concatenate([p.boxes for p in patches]),
            np.concatenate([p.class_ids for p in patches]),
            first_box_id=next_box_id(gt_all, labels_all),
        ),
        schema.GT,
    )
    new_labels = labels_from_boxes(new_gt, source="gt", iteration=iteration)
    sidecar = folder / PROVENANCE
    write_json(_provenance(ids, patches, new_gt, {"tag": tag, **(meta or {})}), sidecar)
    _append(run, images, gt_all, labels_all, new_images, new_gt, new_labels)
    return RccRows(new_images, new_gt, new_labels, sidecar)


def _append(
    run: RunDir,
    images: pa.Table,
    gt: pa.Table,
    labels: pa.Table,
    new_images: pa.Table,
    new_gt: pa.Table,
    new_labels: pa.Table,
) -> None:
    """Append the new rows (stale rows of the new ids dropped); images written last."""
    ids = new_images["image_id"]

    def stale_free(table: pa.Table) -> pa.Table:
        return table.filter(pc.invert(pc.is_in(table["image_id"], value_set=ids)))

    run.write_gt(pa.concat_tables([stale_free(gt), new_gt]))
    run.write_labels(pa.concat_tables([stale_free(labels), new_labels]))
    run.write_images(pa.concat_tables([images, new_images]))


def default_tag(seed: int, options: RccOptions) -> str:
    """``s<seed>`` and the options that are on, e.g. ``s42-scale-aug``."""
    parts = [f"s{seed}"]
    parts += [
        name
        for on, name in (
            (options.full_im, "full"),
            (options.scale, "scale"),
            (options.manual_augmentations, "aug"),
        )
        if on
    ]
    return "-".join(parts)


@dataclass(frozen=True)
class RccReport:
    """What ``run_rcc`` did."""

    targets: tuple[int, ...]
    n_sources: int
    n_crops: int
    n_skipped: int
    canvas: tuple[int, int] | None
    tag: str
    rows: RccRows

    def summary(self) -> str:
        """One line for a person."""
        what = "whole images" if self.canvas is None and self.n_crops else "collages"
        return (
            f"rcc {self.tag}: {self.rows.images.num_rows} {what} with {self.rows.gt.num_rows} "
            f"boxes from {self.n_crops} crops of classes {list(self.targets)} in "
            f"{self.n_sources} labeled images ({self.n_skipped} crops skipped at the box cap)"
        )


def run_rcc(
    run: RunDir,
    *,
    classes: Sequence[int] | None = None,
    k: int = 2,
    seed: int = COMPAT_SEED,
    options: RccOptions = DEFAULT_OPTIONS,
    tag: str | None = None,
    iteration: int | None = None,
) -> RccReport:
    """RCC on the labeled pool images of ``run``: generate, write the files, append the rows.

    Args:
        classes: target class ids (default: the ``k`` rarest among the labeled boxes).
        seed: the generator's seed (``seeding.rng(seed, iteration, "rcc")``; compat 42).
        tag: the output folder and id part (default ``default_tag``).
        iteration: written into the new images and labels rows.

    Raises:
        DataError: no labeled pool image, or the tag already used.
    """
    sources = labeled_sources(run)
    if not sources:
        raise DataError(
            str(run.images_file), None, "state", "no labeled pool image to take crops from"
        )
    all_classes = np.concatenate([s.class_ids for s in sources])
    targets = (
        tuple(int(c) for c in classes)
        if classes is not None
        else tuple(rarest_classes(all_classes, k))
    )
    rng = seeding.rng(seed, iteration, "rcc")
    out = generate(sources, targets, rng=rng, options=options)
    tag = tag or default_tag(seed, options)
    meta = {
        "seed": seed,
        "targets": list(targets),
        "options": asdict(options),
        "canvas": None if out.canvas is None else list(out.canvas),
    }
    rows = write_rcc(run, out.patches, tag=tag, iteration=iteration, meta=meta)
    report = RccReport(targets, len(sources), out.n_crops, out.n_skipped, out.canvas, tag, rows)
    log.info("%s", report.summary())
    return report
