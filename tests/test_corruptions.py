"""Test-time corruptions (ALGORITHMS §6.3): each op against its definition, seeded; flips
move the ground truth with the pixels; `detloop validate` scores every variant."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from detloop.cli.main import main
from detloop.data import schema
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir
from detloop.learners import corruptions as C
from detloop.orchestrator.evaluation.corruption import corrupt_split

GREY = np.full((60, 80, 3), 128, np.uint8)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_every_group_and_its_variants() -> None:
    names = [c.name for c in C.corruptions(list(C.GROUPS))]
    assert names[:5] == ["heq", "snow", "fog", "rain", "noise"]
    assert names[-2:] == ["flip_h", "flip_v"] and len(names) == 1 + 4 + 4 * 10 + 2
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="unknown infer_augment"):
        C.corruptions(["heq", "fgo"])


@pytest.mark.parametrize("name", ["snow", "fog", "rain", "noise", "aug_noise_5"])
def test_random_ops_are_seeded(name: str) -> None:
    op = {c.name: c.op for c in C.corruptions(["alb", "aug"])}[name]
    img = _rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    a, b, other = op(img, _rng(7)), op(img, _rng(7)), op(img, _rng(8))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, other) and not np.array_equal(a, img)


def test_sweeps_start_at_the_image_and_follow_their_formula() -> None:
    img = _rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for kind in ("noise", "blur", "contrast", "brightness"):
        level0 = {c.name: c.op for c in C.corruptions(["aug"])}[f"aug_{kind}_0"]
        assert np.array_equal(level0(img, _rng()), img), kind
    levels = C.sweep_levels()
    assert levels["noise"][-1] == 1000 and levels["blur"][-1] == 51 and levels["contrast"][-1] == 0
    assert not C.contrast(0.0)(img, _rng()).any()
    assert np.array_equal(C.contrast(0.5)(GREY, _rng()), np.full_like(GREY, 64))
    assert np.array_equal(C.brightness(100.0)(GREY, _rng()), np.full_like(GREY, 228))
    # Gaussian noise of variance 400 on mid grey (no clipping within 3σ): Monte Carlo std ≈ 20
    big = np.full((400, 400, 3), 128, np.uint8)
    std = (C.gaussian_noise(400.0)(big, _rng()).astype(float) - 128).std()
    assert std == pytest.approx(20.0, rel=0.02)


def test_motion_blur_is_a_horizontal_box_filter() -> None:
    img = np.zeros((5, 21, 3), np.uint8)
    img[2, 10] = 255
    out = C.motion_blur(5)(img, _rng()).astype(float)
    expected = np.zeros((5, 21))
    expected[2, 8:13] = 255 / 5
    assert np.allclose(out[..., 0], np.rint(expected))
    # brute force on a random image: mean of the k horizontal neighbours, borders repeated
    rnd = _rng(3).integers(0, 256, (6, 17, 3)).astype(np.uint8)
    k = 7
    padded = np.pad(rnd.astype(float), ((0, 0), (3, 3), (0, 0)), "edge")
    brute = np.stack([padded[:, j : j + k].mean(axis=1) for j in range(17)], axis=1)
    assert np.array_equal(C.motion_blur(k)(rnd, _rng()), np.clip(np.rint(brute), 0, 255))


def test_histogram_equalisation_spreads_a_dull_image() -> None:
    dull = (100 + _rng(4).integers(0, 20, (50, 50, 1))).repeat(3, axis=2).astype(np.uint8)
    out = C.histogram_equalise(dull)
    luma = np.asarray(Image.fromarray(out).convert("L"))
    assert luma.min() < 30 and luma.max() > 225  # 20 grey levels spread over the range


def test_flip_boxes_mirror_and_invert() -> None:
    box = np.array([[10.0, 5.0, 30.0, 25.0]])
    assert C.flip_boxes(box, 100, 80, "h").tolist() == [[70.0, 5.0, 90.0, 25.0]]
    assert C.flip_boxes(box, 100, 80, "v").tolist() == [[10.0, 55.0, 30.0, 75.0]]
    for axis in ("h", "v"):
        assert np.array_equal(C.flip_boxes(C.flip_boxes(box, 100, 80, axis), 100, 80, axis), box)
    with pytest.raises(ValueError):
        C.flip_boxes(box, 100, 80, "d")


def test_flipped_ground_truth_covers_the_flipped_pixels(
    digits_tiny_run: RunDir, tmp_path: Path
) -> None:
    """On real images: the crop of a gt box in the original equals, mirrored, the crop of the
    flipped gt box in the flipped image."""
    images = digits_tiny_run.read_images()
    images = images.filter(pc.equal(images["split"], "val")).slice(0, 3)
    gt = digits_tiny_run.read_gt()
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=images["image_id"].combine_chunks()))
    for flip in [c for c in C.corruptions(["flip"])]:
        c_images, c_gt = corrupt_split(images, gt, flip, tmp_path / flip.name, seed=0)
        assert all(x.endswith(f"@{flip.name}") for x in c_images["image_id"].to_pylist())
        files = dict(
            zip(c_images["image_id"].to_pylist(), c_images["file"].to_pylist(), strict=True)
        )
        originals = dict(
            zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True)
        )
        for before, after in zip(gt.to_pylist(), c_gt.to_pylist(), strict=True):
            assert after["image_id"] == f"{before['image_id']}@{flip.name}"
            src = np.asarray(Image.open(originals[before["image_id"]]).convert("RGB"))
            dst = np.asarray(Image.open(files[after["image_id"]]).convert("RGB"))
            b = [round(before[c]) for c in schema.COORDS]
            a = [round(after[c]) for c in schema.COORDS]
            crop, crop2 = src[b[1] : b[3], b[0] : b[2]], dst[a[1] : a[3], a[0] : a[2]]
            mirrored = crop2[:, ::-1] if flip.flip == "h" else crop2[::-1]
            assert crop.size and np.array_equal(crop, mirrored)


@pytest.mark.slow
def test_validate_scores_every_variant(digits_tiny_run: RunDir, tmp_path: Path) -> None:
    import yaml

    settings = {
        "model": {"preset": "tiny", "mc_dropoutsamp": 2},
        "train": {"device": "cpu", "max_steps": 4, "batch_size": 4, "epochs": 1},
        "predict": {"batch_size": 8, "infer_augment": ["heq", "flip"]},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    run = digits_tiny_run
    common = [str(cfg), "--run", str(run.path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *common]) == 0
        assert main(["validate", *common, "--iteration", "0"]) == 0
    report = read_json(run.metrics_file(0))["validation"]["corruptions"]
    assert list(report) == ["none", "heq", "flip_h", "flip_v"]
    clean = report["none"]
    assert clean["map"] == pytest.approx(read_json(run.metrics_file(0))["validation"]["map"]["map"])
    for scores in report.values():
        assert 0.0 <= scores["map"] <= 1.0 and scores["detections"] > 0
        assert "loc_ece_al_uncal" in scores and "loc_ece_mc_uncal" in scores
    preds = read_table(
        schema.PREDICTIONS, run.validation_dir(0) / "corruptions_predictions.parquet"
    )
    suffixes = {x.rsplit("@", 1)[1] for x in preds["image_id"].to_pylist()}
    assert suffixes == {"heq", "flip_h", "flip_v"}
    assert (run.validation_dir(0) / "corruptions.png").stat().st_size > 0
    study = read_json(run.metrics_file(0))["validation"]["ep_vs_al"]  # both std families
    assert sum(q["n"] for q in study["quadrants"].values()) == study["n_pairs"] > 0
    assert (run.validation_dir(0) / "ep_vs_al.png").stat().st_size > 0
