"""``detloop train|predict|evaluate`` end to end on digits-det tiny (tiny preset, few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from detloop.cli.main import main
from detloop.data import schema
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    doc = {
        "name": "cli",
        "model": {"preset": "tiny", "mc_dropoutsamp": 3},
        "train": {"max_steps": 3, "batch_size": 4, "device": "cpu", "torch_threads": 1},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_train_predict_render_evaluate(
    digits_tiny_run: RunDir, config: Path, tmp_path: Path
) -> None:
    run = str(digits_tiny_run.path)
    assert main(["predict", str(config), "--run", run]) == 2  # no checkpoint yet
    assert main(["train", str(config), "--run", run, "--set", "train.max_steps=2"]) == 0
    ckpt = digits_tiny_run.checkpoint(0)
    assert (ckpt / "model.pt").exists() and read_json(ckpt / "metadata.json")["steps"] == 2

    render = tmp_path / "render"
    assert (
        main(["predict", str(config), "--run", run, "--split", "val", "--render", str(render)]) == 0
    )
    table = read_table(schema.PREDICTIONS, digits_tiny_run.val_predictions_file(0))
    assert table.num_rows > 0 and table.column("al_x1").null_count == 0
    assert len(list(render.glob("*.png"))) == 32

    folder = tmp_path / "folder_preds.parquet"
    images_dir = Path(digits_tiny_run.read_images().column("file")[0].as_py()).parent
    assert (
        main(
            [
                "predict",
                str(config),
                "--run",
                run,
                "--images",
                str(images_dir),
                "--out",
                str(folder),
            ]
        )
        == 0
    )
    assert read_table(schema.PREDICTIONS, folder).num_rows > 0
    # a frame range, rendered once with the predictions and once per uncertainty
    frames, out = tmp_path / "frames", tmp_path / "frames.parquet"
    rng = ["--first", "3", "--last", "7", "--images", str(images_dir)]
    args = ["predict", str(config), "--run", run, *rng, "--out", str(out), "--render", str(frames)]
    assert main([*args, "--set", "predict.min_score=0.0"]) == 0
    ids = sorted(p.stem for p in images_dir.glob("*.png"))[3:7]
    assert sorted(p.stem for p in frames.glob("*.png")) == ids
    assert set(read_table(schema.PREDICTIONS, out)["image_id"].to_pylist()) <= set(ids)
    views = sorted(d.name for d in (frames / "uncertainty").iterdir())
    assert views == ["al_box", "entropy", "mc_box", "mc_class"]
    for view in views:
        assert sorted(p.stem for p in (frames / "uncertainty" / view).glob("*.png")) == ids
    with (
        Image.open(frames / "uncertainty" / "entropy" / f"{ids[0]}.png") as a,
        Image.open(frames / f"{ids[0]}.png") as b,
    ):
        assert a.size == b.size and a.tobytes() != b.tobytes()  # other colours, other text
    assert main(["predict", str(config), "--run", run, "--first", "5", "--last", "5"]) == 2
    weights = ["--checkpoint", str(ckpt / "model.pt"), "--out", str(tmp_path / "w.parquet")]
    assert main(["predict", str(config), "--run", run, "--split", "val", *weights]) == 0
    assert read_table(schema.PREDICTIONS, tmp_path / "w.parquet").equals(table)

    assert main(["evaluate", str(config), "--run", run, "--iteration", "0"]) == 0
    metrics = read_json(digits_tiny_run.metrics_file(0))["evaluate_val"]
    assert 0.0 <= metrics["map50"] <= 1.0 and "ap/7" in metrics
    eval_dir = digits_tiny_run.eval_dir(0)
    curves = read_json(eval_dir / "val_curves.json")
    assert curves["ap_vs_iou"]["ap"][9] == pytest.approx(metrics["map50"], abs=1e-9)
    assert len(curves["confusion"]["matrix"]) == 11 and "7" in curves["roc"]["per_class"]
    for name in ("ap_vs_iou", "confusion", "roc"):
        assert (eval_dir / f"val_{name}.png").stat().st_size > 0


def test_user_errors_exit_2(digits_tiny_run: RunDir, config: Path, tmp_path: Path) -> None:
    run = str(digits_tiny_run.path)
    assert main(["train", str(config), "--run", str(tmp_path / "empty")]) == 2
    missing = ["--set", f"model.weights={tmp_path / 'nope.pt'}"]
    assert main(["train", str(config), "--run", run, *missing]) == 2
    assert main(["evaluate", str(config), "--run", run, "--iteration", "4"]) == 2
    assert main(["train", str(config), "--run", run, "--set", "model.image_size=100"]) == 2
