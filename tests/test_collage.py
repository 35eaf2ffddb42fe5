"""RCC — Rare Class Collage (ALGORITHMS §11.3, pin (f)): crop geometry, packing, collages, and
the images and rows written into a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from detloop.data import schema
from detloop.data.collage import (
    MAX_BOXES,
    Patch,
    RccOptions,
    Slot,
    Source,
    arrange_2x2,
    augment,
    boxes_in_crop,
    crop_rect,
    extract_crops,
    generate,
    make_collages,
    natural_width,
    pack,
    rarest_classes,
    rcc_dir,
    run_rcc,
)
from detloop.data.errors import DataError
from detloop.data.io import read_json
from detloop.data.labels import box_rows, labels_from_boxes
from detloop.data.rundir import RunDir

W, H = 160, 96


def _gradient(width: int = W, height: int = H, seed: int = 0) -> Image.Image:
    """An RGB image whose pixels say where they are (and a seeded noise channel)."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 256, (height, width))
    rgb = np.stack([xx % 256, yy % 256, noise], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _source(image_id: str, boxes: list[list[float]], classes: list[int], first: int = 0) -> Source:
    n = len(boxes)
    return Source(
        image_id,
        f"{image_id}.png",
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(classes, dtype=np.int64),
        np.arange(first, first + n, dtype=np.int64),
    )


def _random_sources(n: int, seed: int) -> list[Source]:
    """``n`` images of W x H with 1-8 random boxes of classes 0-3 (class 3 rare)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 9))
        x1 = rng.uniform(0, W - 20, k)
        y1 = rng.uniform(0, H - 20, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(4, 40, k), y1 + rng.uniform(4, 40, k)], 1)
        boxes = np.minimum(boxes, [W, H, W, H])
        classes = rng.choice(4, size=k, p=[0.45, 0.3, 0.15, 0.1])
        out.append(_source(f"pool/{i:03d}", boxes.tolist(), classes.tolist(), first=100 * i))
    return out


def _loader(seed: int = 0) -> dict[str, Image.Image]:
    return {f"pool/{i:03d}.png": _gradient(seed=i + seed) for i in range(40)}


# ---- crops ------------------------------------------------------------------------------------
def test_a_hand_crop_has_the_known_enlargement_and_clipped_boxes() -> None:
    # box 20 x 20 at (40, 30), p = 0.5: 10 px more on every side
    assert crop_rect([40, 30, 60, 50], 0.5, W, H) == (30, 20, 70, 60)
    # p = 1 near the corner: clipped to the image; fractional edges widened to whole pixels
    assert crop_rect([5, 5, 25, 15], 1.0, W, H) == (0, 0, 45, 25)
    assert crop_rect([10.5, 10.5, 20.25, 20.25], 0.5, W, H) == (5, 5, 26, 26)
    assert crop_rect([150, 80, 158, 94], 1.0, W, H) == (142, 66, 160, H)
    boxes = [
        [40, 30, 60, 50],  # the target, inside
        [20, 25, 35, 40],  # right edge and both y-edges inside: clipped to (0, 5, 5, 20)
        [68, 50, 90, 70],  # clipped to 2 x 10 px: not > 2, dropped
        [0, 0, 160, 96],  # no edge inside the crop
        [10, 30, 29, 50],  # no x-edge inside
        [31, 21, 32, 40],  # 1 px wide
        [35, 10, 45, 25],  # bottom edge inside: clipped to (5, 0, 15, 5)
        [30, 30, 40, 40],  # left edge on the crop's edge (not strictly inside), right inside
    ]
    clipped, idx = boxes_in_crop((30, 20, 70, 60), boxes)
    assert idx.tolist() == [0, 1, 6, 7]
    np.testing.assert_array_equal(
        clipped, [[10, 10, 30, 30], [0, 5, 5, 20], [5, 0, 15, 5], [0, 10, 10, 20]]
    )


def test_extract_crops_cuts_the_pixels_of_the_rectangle_with_a_fixed_p() -> None:
    image = _gradient()
    source = _source("pool/a", [[40, 30, 60, 50], [20, 25, 35, 40], [100, 10, 110, 20]], [1, 0, 0])
    opts = RccOptions(p_range=(0.5, 0.5))
    crops, skipped = extract_crops(source, image, [1], np.random.default_rng(0), opts)
    assert skipped == 0 and len(crops) == 1
    crop = crops[0]
    assert crop.image.size == (40, 40)
    np.testing.assert_array_equal(np.asarray(crop.image), np.asarray(image)[20:60, 30:70])
    np.testing.assert_array_equal(crop.boxes, [[10, 10, 30, 30], [0, 5, 5, 20]])
    assert crop.class_ids.tolist() == [1, 0] and crop.parent_box_ids.tolist() == [0, 1]
    assert crop.parents == ("pool/a",) and crop.box_parent == ("pool/a", "pool/a")


def test_a_crop_with_100_boxes_is_skipped_and_99_kept() -> None:
    image = _gradient()
    for n_small, kept in ((99, 1), (98, 1), (100, 0)):
        # the target (class 1) is one of the boxes; small 4 x 4 boxes fill the crop
        small = [
            [31 + (i % 10) * 3.5, 21 + (i // 10) * 3.5, 35 + (i % 10) * 3.5, 25 + (i // 10) * 3.5]
            for i in range(n_small - 1)
        ]
        source = _source("pool/a", [[40, 30, 60, 50], *small], [1] + [0] * len(small))
        opts = RccOptions(p_range=(0.5, 0.5))
        crops, skipped = extract_crops(source, image, [1], np.random.default_rng(0), opts)
        assert (len(crops), skipped) == (kept, 1 - kept), n_small
        if crops:
            assert crops[0].n_boxes == n_small


# ---- packing ----------------------------------------------------------------------------------
def test_pack_squeezes_the_overflowing_crop_and_stretches_the_last() -> None:
    # canvas 100: 30 + 50 fit, 40 would overflow -> squeezed to 20; 20 + 10, then no crops
    # left -> the last is stretched from 10 to 80
    assert pack([30, 50, 40, 20, 10], [1] * 5, 100) == [
        [Slot(0, 0, 30), Slot(1, 30, 50), Slot(2, 80, 20)],
        [Slot(3, 0, 20), Slot(4, 20, 80)],
    ]
    # an exact fit needs neither; a crop wider than the canvas is squeezed to it
    assert pack([60, 40, 250], [1, 1, 1], 100) == [
        [Slot(0, 0, 60), Slot(1, 60, 40)],
        [Slot(2, 0, 100)],
    ]


def test_pack_closes_a_collage_before_the_box_cap_and_stretches_its_last_crop() -> None:
    assert pack([10, 10, 10], [60, 40, 1], 100) == [
        [Slot(0, 0, 10), Slot(1, 10, 90)],
        [Slot(2, 0, 100)],
    ]
    assert pack([10, 10], [60, 41], 100) == [[Slot(0, 0, 100)], [Slot(1, 0, 100)]]
    with pytest.raises(ValueError, match="more than the cap"):
        pack([10], [101], 100)


def test_natural_width_keeps_the_aspect() -> None:
    assert natural_width((40, 20), 96) == 192
    assert natural_width((10, 30), 96) == 32
    assert natural_width((1, 500), 96) == 1


def test_the_2x2_arrangement_tiles_the_patch_with_scaled_copies() -> None:
    patch = Patch(
        _gradient(100, 40),
        np.array([[0.0, 0.0, 100.0, 40.0], [50.0, 20.0, 60.0, 40.0]]),
        np.array([3, 4]),
        ("pool/a", "pool/a"),
        np.array([7, 8]),
        ("pool/a",),
    )
    out = arrange_2x2(patch)
    assert out.image.size == (100, 40)
    # columns 75 | 25, rows 30 | 10
    np.testing.assert_allclose(
        out.boxes[::2], [[0, 0, 75, 30], [75, 0, 100, 30], [0, 30, 75, 40], [75, 30, 100, 40]]
    )
    np.testing.assert_allclose(out.boxes[1], [37.5, 15, 45, 30])
    assert out.class_ids.tolist() == [3, 4] * 4 and out.parent_box_ids.tolist() == [7, 8] * 4


def test_manual_augmentations() -> None:
    patch = Patch(
        _gradient(50, 20),
        np.array([[5.0, 2.0, 15.0, 12.0]]),
        np.array([0]),
        ("pool/a",),
        np.array([0]),
        ("pool/a",),
    )
    rng = np.random.default_rng(0)
    flipped, _ = augment(patch, rng, "hflip")
    np.testing.assert_array_equal(flipped.boxes, [[35, 2, 45, 12]])
    np.testing.assert_array_equal(np.asarray(flipped.image), np.asarray(patch.image)[:, ::-1])
    noisy, _ = augment(patch, rng, "noise")
    diff = np.asarray(noisy.image, np.int16) - np.asarray(patch.image, np.int16)
    unclipped = np.asarray(patch.image) < 236
    assert diff[unclipped].min() >= 5 and diff[unclipped].max() <= 19
    for op in ("brightness", "contrast", "blur"):
        out, name = augment(patch, rng, op)
        assert name == op and out.image.size == patch.image.size
        np.testing.assert_array_equal(out.boxes, patch.boxes)
    drawn = {augment(patch, rng)[1] for _ in range(60)}
    assert drawn == {"hflip", "brightness", "contrast", "blur", "noise"}
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(patch, rng, "sharpen")


# ---- collages ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [RccOptions(), RccOptions(scale=True), RccOptions(manual_augmentations=True, scale=True)],
    ids=["plain", "scale", "scale+aug"],
)
def test_collage_geometry(options: RccOptions) -> None:
    images = _loader()
    sources = _random_sources(40, seed=1)
    out = generate(
        sources, [2, 3], rng=np.random.default_rng(5), options=options, load=images.__getitem__
    )
    assert out.canvas == (W, H) and out.n_crops > 10 and len(out.patches) >= 2
    n_target_boxes = sum(int(np.isin(s.class_ids, [2, 3]).sum()) for s in sources)
    assert out.n_crops + out.n_skipped == n_target_boxes
    for collage in out.patches:
        assert collage.image.size == (W, H)
        assert 0 < collage.n_boxes <= MAX_BOXES
        b = collage.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(collage.box_parent) == len(collage.parent_box_ids) == collage.n_boxes
        assert set(collage.box_parent) <= set(collage.parents)
        # filled edge to edge: the rightmost column is not the black background everywhere
        assert np.asarray(collage.image)[:, -1].any()


def test_collages_hold_at_most_100_boxes_and_drop_no_crop() -> None:
    image = _gradient()
    # 6 crops of 40 boxes each: two crops per collage, never three
    crops = []
    for k in range(6):
        boxes = np.tile([[1.0, 1.0, 9.0, 9.0]], (40, 1))
        crops.append(
            Patch(
                image.crop((0, 0, 30, 40)),
                boxes,
                np.zeros(40, np.int64),
                ("x",) * 40,
                np.arange(40),
                (f"pool/{k}",),
            )
        )
    collages, skipped = make_collages(crops, (W, H), np.random.default_rng(0))
    assert skipped == 0 and [c.n_boxes for c in collages] == [80, 80, 80]
    # with scale a 40-box crop would carry 160 boxes: skipped; 25 boxes -> 100 fit alone
    small = [
        Patch(
            c.image,
            c.boxes[:25],
            c.class_ids[:25],
            c.box_parent[:25],
            c.parent_box_ids[:25],
            c.parents,
        )
        for c in crops[:2]
    ]
    rng = np.random.default_rng(0)
    collages, skipped = make_collages([*crops[:1], *small], (W, H), rng, RccOptions(scale=True))
    assert skipped == 1 and [c.n_boxes for c in collages] == [100, 100]


def test_full_images_are_the_whole_rare_class_images() -> None:
    images = _loader()
    sources = _random_sources(12, seed=3)
    out = generate(
        sources,
        [3],
        rng=np.random.default_rng(0),
        options=RccOptions(full_im=True),
        load=images.__getitem__,
    )
    rare = [s for s in sources if 3 in s.class_ids.tolist()]
    assert out.canvas is None and len(out.patches) == len(rare) > 0
    for patch, source in zip(out.patches, rare, strict=True):
        assert patch.parents == (source.image_id,)
        np.testing.assert_array_equal(patch.boxes, source.boxes)
        np.testing.assert_array_equal(np.asarray(patch.image), np.asarray(images[source.file]))


def test_same_seed_same_collages_and_another_seed_others() -> None:
    images = _loader()
    sources = _random_sources(30, seed=2)
    opts = RccOptions(scale=True, manual_augmentations=True)

    def run(seed: int) -> list[tuple[bytes, list[list[float]]]]:
        out = generate(
            sources, [3], rng=np.random.default_rng(seed), options=opts, load=images.__getitem__
        )
        return [(p.image.tobytes(), p.boxes.tolist()) for p in out.patches]

    first = run(7)
    assert first and first == run(7)
    assert first != run(8)


def test_rarest_classes() -> None:
    ids = [0] * 10 + [1] * 3 + [2] + [3] * 5 + [4] * 3
    assert rarest_classes(ids) == [2, 1]
    assert rarest_classes(ids, k=3) == [2, 1, 4]
    assert rarest_classes([5, 5], k=4) == [5]


# ---- into a run -------------------------------------------------------------------------------
def _make_run(tmp_path: Path) -> RunDir:
    """A run with 12 labeled pool images (oracle labels), 4 unlabeled ones and 2 val images."""
    run = RunDir(tmp_path / "run")
    src = tmp_path / "images"
    src.mkdir()
    sources = _random_sources(18, seed=4)
    files, states, splits = [], [], []
    for i in range(len(sources)):
        file = src / f"{i:03d}.png"
        _gradient(seed=i).save(file)
        files.append(str(file))
        states.append("labeled" if i < 12 or i >= 16 else "unlabeled")
        splits.append("val" if i >= 16 else "pool")
    n = len(sources)
    ids = [s.image_id if i < 16 else f"val/{i:03d}" for i, s in enumerate(sources)]
    run.write_images(
        pa.table(
            {
                "image_id": ids,
                "file": files,
                "width": pa.array([W] * n, pa.int32()),
                "height": pa.array([H] * n, pa.int32()),
                "split": splits,
                "state": states,
                "iteration": pa.array([0] * n, pa.int32()),
                "phash": pa.nulls(n, pa.uint64()),
                "source_id": pa.nulls(n, pa.string()),
                "reason": pa.nulls(n, pa.string()),
            }
        )
    )
    gt = box_rows(
        [iid for iid, s in zip(ids, sources, strict=True) for _ in range(len(s.boxes))],
        np.concatenate([s.boxes for s in sources]),
        np.concatenate([s.class_ids for s in sources]),
    )
    run.write_gt(gt)
    labeled = [
        iid
        for iid, st, sp in zip(ids, states, splits, strict=True)
        if st == "labeled" and sp == "pool"
    ]
    rows = gt.filter(pc.is_in(gt["image_id"], value_set=pa.array(labeled)))
    run.write_labels(labels_from_boxes(rows, source="oracle", iteration=0))
    return run


def test_run_rcc_writes_images_and_appends_rows(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    before = {t: getattr(run, f"read_{t}")() for t in ("images", "gt", "labels")}
    report = run_rcc(run, classes=[3], seed=42)
    rows = report.rows
    assert report.tag == "s42" and report.n_sources == 12 and report.canvas == (W, H)
    assert rows.images.num_rows >= 1 and rows.labels.num_rows == rows.gt.num_rows > 0
    # files under <run>/generated/rcc/<tag>/ that load at the collage size
    folder = rcc_dir(run, "s42")
    for iid, file in zip(
        rows.images["image_id"].to_pylist(), rows.images["file"].to_pylist(), strict=True
    ):
        assert Path(file).parent == folder.resolve() and iid.startswith("pool/rcc/s42/")
        with Image.open(file) as im:
            im.load()
            assert im.size == (W, H) and im.mode == "RGB"
    # the rows validate, are appended, and leave every existing row as it was
    after = {t: getattr(run, f"read_{t}")() for t in ("images", "gt", "labels")}
    for name, spec in (("images", schema.IMAGES), ("gt", schema.GT), ("labels", schema.LABELS)):
        schema.validate_table(after[name], spec)
        assert after[name].slice(0, before[name].num_rows).equals(before[name])
        assert after[name].num_rows == before[name].num_rows + getattr(rows, name).num_rows
    assert set(rows.images["state"].to_pylist()) == {"labeled"}
    assert set(rows.images["split"].to_pylist()) == {"pool"}
    assert set(rows.labels["source"].to_pylist()) == {"gt"}
    assert rows.labels["box_id"].equals(rows.gt["box_id"])
    old_ids = set(before["gt"]["box_id"].to_pylist()) | set(before["labels"]["box_id"].to_pylist())
    assert not old_ids & set(rows.gt["box_id"].to_pylist())
    # provenance: every box's parent is a labeled pool image and its box id there
    doc = read_json(rows.provenance) if rows.provenance else {}
    assert (
        doc["seed"] == 42 and doc["targets"] == [3] and len(doc["images"]) == rows.images.num_rows
    )
    labels = before["labels"]
    by_id = dict(zip(labels["box_id"].to_pylist(), labels["image_id"].to_pylist(), strict=True))
    for item in doc["images"]:
        assert item["parent_image_ids"] == [by_id[b] for b in item["parent_box_ids"]]
        assert set(item["parent_image_ids"]) <= set(item["parents"])
        assert all(p.startswith("pool/") and int(p[5:]) < 12 for p in item["parents"])


def test_run_rcc_never_overwrites_and_skips_its_own_images(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    first = run_rcc(run, k=2, seed=1)
    n_images = run.read_images().num_rows
    with pytest.raises(DataError, match="already in the run"):
        run_rcc(run, k=2, seed=1)
    assert run.read_images().num_rows == n_images
    second = run_rcc(run, k=2, seed=1, tag="again", options=RccOptions(full_im=True))
    assert second.n_sources == first.n_sources  # the collages are no parents
    assert second.targets == first.targets
    ids = run.read_gt()["box_id"].to_pylist()
    assert len(ids) == len(set(ids))
    with pytest.raises(DataError, match="tag"):
        run_rcc(run, tag="../x")


def test_the_rcc_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from detloop.cli.main import main

    run = _make_run(tmp_path)
    run.write_categories(
        pa.table(
            {
                "class_id": pa.array([0, 1, 2, 3], pa.int32()),
                "name": ["a", "b", "c", "d"],
                "source_id": pa.array([1, 2, 3, 4], pa.int64()),
            }
        )
    )
    n_before = run.read_images().num_rows
    assert main(["rcc", "--run", str(run.path), "--classes", "d", "--scale"]) == 0
    out = capsys.readouterr().out
    assert "rcc s42-scale:" in out and "classes [3]" in out
    assert run.read_images().num_rows > n_before
    assert main(["rcc", "--run", str(run.path), "--classes", "zebra"]) == 2
    assert "unknown" in capsys.readouterr().err
