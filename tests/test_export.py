"""`detloop export-model`: the exported ONNX file, run by onnxruntime on real images from disk,
matches torch, and detloop's post-processing of its outputs gives the predictions table of
`detloop predict`; TorchScript too."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from detloop.cli.main import main
from detloop.config import ExperimentConfig
from detloop.data.dataset import DetectionDataset, collate
from detloop.data.rundir import RunDir
from detloop.learners import export
from detloop.learners.checkpoint import model_from_checkpoint
from detloop.learners.loss import make_anchors
from detloop.learners.predict import Predictor

pytestmark = pytest.mark.slow
SETTINGS = {
    "model": {"preset": "tiny", "mc_dropoutsamp": 1},
    "train": {"device": "cpu", "max_steps": 8, "batch_size": 4, "epochs": 1},
    "predict": {"batch_size": 4, "min_score": 0.0},
}


def cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(list(argv))


@pytest.fixture(scope="module")
def trained(
    digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunDir, ExperimentConfig]:
    from detloop.data.digits import digits_source
    from detloop.data.importer import import_source

    base = tmp_path_factory.mktemp("export")
    run = RunDir(base / "run")
    for split in ("pool", "val"):
        source, images = digits_source(digits_tiny, split)
        import_source(run, "coco", source, split, images=images)
    cfg_path = base / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(SETTINGS))
    assert cli("train", str(cfg_path), "--run", str(run.path)) == 0
    return run, ExperimentConfig.model_validate(SETTINGS)


def _val_batch(run: RunDir, spec_size: tuple[int, int], n: int) -> tuple[np.ndarray, dict]:
    import pyarrow.compute as pc

    images = run.read_images()
    images = images.filter(pc.equal(images["split"], "val")).slice(0, n)
    data = DetectionDataset(images, None, spec_size)
    batch = collate([data[i] for i in range(len(data))])
    return batch["image"].numpy(), {"images": images, "batch": batch, "data": data}


def test_onnx_matches_torch_and_decodes_to_the_same_predictions(
    trained: tuple[RunDir, ExperimentConfig], tmp_path: Path
) -> None:
    run, cfg = trained
    out = tmp_path / "onnx"
    argv = [
        "export-model",
        str(run.path),
        "--iteration",
        "0",
        "--out",
        str(out),
        "--format",
        "onnx",
        "--check",
    ]
    assert cli(*argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["max_abs_diff"] <= 1e-4 and manifest["check"]["images"] == 8
    assert set(manifest["files"]) == {
        "model.onnx",
        "anchors.npy",
        "model_spec.json",
        "classes.json",
    }
    assert json.loads((out / "classes.json").read_text()) == [str(d) for d in range(10)]
    model, _ = model_from_checkpoint(run.checkpoint(0))
    anchors = np.load(out / "anchors.npy")
    assert np.array_equal(anchors, make_anchors(model.spec).boxes.numpy().astype(np.float32))

    x, ctx = _val_batch(run, model.spec.image_size, 6)  # another batch size than the export's
    served = export.run_onnx(out / "model.onnx", x)
    reference = export.torch_outputs(model, x)
    assert [o.shape for o in served] == [o.shape for o in reference]
    assert len(anchors) == served[0].shape[1]
    for a, b in zip(served, reference, strict=True):
        assert np.abs(a - b).max() <= 1e-4

    predictor = Predictor(model, cfg)
    table = predictor.predict(ctx["images"], seed=0)
    data, batch = ctx["data"], ctx["batch"]
    sizes = list(zip(ctx["images"]["width"].to_pylist(), ctx["images"]["height"].to_pylist(),
                     strict=True))  # fmt: skip
    decoded = export.predictions_from_outputs(
        predictor, served, data.image_ids, batch["scale"].tolist(), sizes, seed=0
    )
    assert decoded.num_rows == table.num_rows > 0
    assert table["mc_x1"].null_count == table.num_rows  # MC model, one pass: no MC estimate
    for col in ("image_id", "class_id"):
        assert decoded[col].to_pylist() == table[col].to_pylist()
    for col in ("score", "x1", "y1", "x2", "y2", "al_x1", "entropy"):
        assert np.allclose(decoded[col].to_numpy(), table[col].to_numpy(), atol=1e-3), col


def test_torchscript_and_bad_input(
    trained: tuple[RunDir, ExperimentConfig], tmp_path: Path
) -> None:
    run, _ = trained
    out = tmp_path / "ts"
    argv = ["export-model", str(run.path), "--iteration", "0", "--out", str(out)]
    assert cli(*argv, "--format", "torchscript", "--check", "--check-images", "3") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_file"] == "model.torchscript.pt"
    assert manifest["check"]["max_abs_diff"] <= 1e-4
    assert cli("export-model", str(run.path), "--iteration", "7", "--out", str(out)) == 2
    assert cli("export-model", str(tmp_path / "nope"), "--iteration", "0", "--out", str(out)) == 2


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_a_bundle_predicts_a_renamed_dataset_like_its_source(
    trained: tuple[RunDir, ExperimentConfig], digits_tiny: Path, tmp_path: Path
) -> None:
    """The rename-folders trick: the same images with every class renamed (and the category
    ids reversed) are predicted by the bundle, through model.class_map, exactly as the source
    run predicts them; a name the map misses is an error naming it."""
    from detloop.data import schema
    from detloop.data.digits import digits_source
    from detloop.data.importer import import_source
    from detloop.data.io import read_table

    run, _ = trained
    bundle = tmp_path / "bundle"
    assert cli("export-model", str(run.path), "--iteration", "0", "--out", str(bundle)) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "detloop-bundle" and manifest["classes"] == [
        str(d) for d in range(10)
    ]
    assert {"model.pt", "metadata.json", "classes.json"} <= set(
        manifest["files"]
    )  # no run.json here
    assert (bundle / "model.pt").read_bytes() == (run.checkpoint(0) / "model.pt").read_bytes()

    source, images = digits_source(digits_tiny, "val")
    doc = json.loads(Path(source).read_text())
    n = len(doc["categories"])
    new_id = {c["id"]: n + 1 - c["id"] for c in doc["categories"]}
    doc["categories"] = [{**c, "id": new_id[c["id"]], "name": WORDS[int(c["name"])]}
                         for c in doc["categories"]]  # fmt: skip
    doc["annotations"] = [
        {**a, "category_id": new_id[a["category_id"]]} for a in doc["annotations"]
    ]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(doc))
    other = RunDir(tmp_path / "other")
    import_source(other, "coco", renamed, "val", images=images)
    assert other.class_names() != run.class_names()

    cfg = tmp_path / "cfg.yaml"
    mapping = {w: str(d) for d, w in enumerate(WORDS)}
    cfg.write_text(
        yaml.safe_dump({**SETTINGS, "model": {**SETTINGS["model"], "class_map": mapping}})
    )
    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    common = ["--split", "val", "--set", "predict.min_score=0.0"]
    assert cli("predict", str(cfg), "--run", str(other.path), "--checkpoint", str(bundle),
               "--out", str(theirs), *common) == 0  # fmt: skip
    assert cli("predict", str(cfg), "--run", str(run.path), "--iteration", "0",
               "--out", str(ours), *common) == 0  # fmt: skip
    a, b = read_table(schema.PREDICTIONS, ours), read_table(schema.PREDICTIONS, theirs)
    assert a.num_rows == b.num_rows > 0
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    for col in ("score", "x1", "y1", "x2", "y2", "al_x1", "entropy"):
        assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-5), col
    names_a, names_b = run.class_names(), other.class_names()
    assert names_a is not None and names_b is not None
    assert [WORDS[int(names_a[c])] for c in a["class_id"].to_pylist()] == [
        names_b[c] for c in b["class_id"].to_pylist()
    ]

    partial = {k: v for k, v in mapping.items() if k != "seven"}
    cfg.write_text(
        yaml.safe_dump({**SETTINGS, "model": {**SETTINGS["model"], "class_map": partial}})
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli("predict", str(cfg), "--run", str(other.path), "--checkpoint", str(bundle),
                   "--out", str(theirs), *common) == 2  # fmt: skip
    assert "run classes without a model class: seven" in err.getvalue()


def test_a_bundle_autolabels_a_renamed_copy_with_the_same_verdicts(
    trained: tuple[RunDir, ExperimentConfig], digits_tiny: Path, tmp_path: Path
) -> None:
    """A model auto-labels digits-det's test split in an AutoLabelRun (validated, calibrated and
    thresholded on val there); bundled from that run, it auto-labels a copy of the frames whose
    classes are renamed, with no validation split: its own calibrators, thresholds and min
    score are reused (nothing is fitted again) and every frame gets the same verdict."""
    from detloop.data import schema
    from detloop.data.digits import digits_source
    from detloop.data.io import read_table
    from detloop.data.rundir import RunsRoot

    runs = tmp_path / "runs"
    settings = {**SETTINGS, "predict": {"batch_size": 4}, "runs_root": str(runs),
                "ray": {"in_process": True}, "tracking": {"enabled": False},
                "thresholding": {"n_trials": 12, "patience": 6}}  # fmt: skip
    data, renamed = {}, {}
    for split, key in (("val", "val"), ("test", "pool")):
        coco, images = digits_source(digits_tiny, split)
        data[key] = {"format": "coco", "source": str(coco), "images": str(images)}
        doc = json.loads(Path(coco).read_text())
        doc["categories"] = [{**c, "name": WORDS[int(c["name"])]} for c in doc["categories"]]
        (tmp_path / f"renamed_{split}.json").write_text(json.dumps(doc))
        renamed[key] = {**data[key], "source": str(tmp_path / f"renamed_{split}.json")}
    cfg = tmp_path / "src.yaml"
    cfg.write_text(yaml.safe_dump({**settings, "name": "src", "data": data}))
    assert cli("autolabel", str(cfg), "--checkpoint", str(trained[0].checkpoint(0))) == 0
    source = RunsRoot(runs).run("src", "autolabel-s0")
    bundle = tmp_path / "bundle"
    assert cli("export-model", str(source.path), "--iteration", "0", "--out", str(bundle)) == 0
    assert (bundle / "thresholds.json").read_bytes() == source.thresholds_file(1).read_bytes()
    assert (bundle / "calibration").is_dir()

    mapped = tmp_path / "copy.yaml"
    class_map = {w: str(d) for d, w in enumerate(WORDS)}
    model = {**SETTINGS["model"], "class_map": class_map}
    copy_settings = {**settings, "name": "copy", "data": {"pool": renamed["pool"]}, "model": model}
    mapped.write_text(yaml.safe_dump(copy_settings))
    assert cli("autolabel", str(mapped), "--checkpoint", str(bundle)) == 0
    copy = RunsRoot(runs).run("copy", "autolabel-s0")
    phases = {h["phase"] for h in copy.read_meta()["history"]}
    assert not phases & {"evaluate", "calibrate", "threshold"}  # the bundle's fits, as they are
    assert copy.thresholds_file(1).read_bytes() == (bundle / "thresholds.json").read_bytes()
    ours = read_table(schema.SELECTION, source.selection_file(1))
    theirs = read_table(schema.SELECTION, copy.selection_file(1))
    assert ours.num_rows == 32 and theirs.equals(ours)  # verdicts, u, δ̄, counts
    assert (
        copy.read_labels()
        .select(["image_id", "class_id", "x1"])
        .equals(source.read_labels().select(["image_id", "class_id", "x1"]))
    )


def test_training_starts_from_a_bundle_on_renamed_and_new_classes(
    trained: tuple[RunDir, ExperimentConfig], digits_tiny: Path, tmp_path: Path
) -> None:
    """``model.weights: BUNDLE`` on data whose classes are renamed and re-ordered
    (``model.class_map``), one of them unknown to the model: every tensor comes from the bundle,
    the class layer's rows follow the names, the new class keeps its fresh rows; a map to a
    class the model lacks is an error naming it (exit 2)."""
    import torch

    from detloop.data.digits import digits_source
    from detloop.data.importer import import_source
    from detloop.learners import checkpoint as ckpt
    from detloop.learners.bundle import CLASS_KEYS, load_start_weights
    from detloop.learners.model import UncertainEfficientDet, resolve_spec

    run, cfg = trained
    bundle = tmp_path / "bundle"
    assert cli("export-model", str(run.path), "--iteration", "0", "--out", str(bundle)) == 0
    source, images = digits_source(digits_tiny, "pool")
    doc = json.loads(Path(source).read_text())
    new_id = {c["id"]: 11 - c["id"] for c in doc["categories"]}  # re-ordered
    names = {c["id"]: WORDS[int(c["name"])] for c in doc["categories"]}
    names[10] = "question_mark"  # digit 9's canvases, a class the model has never seen
    doc["categories"] = [{**c, "id": new_id[c["id"]], "name": names[c["id"]]}
                         for c in doc["categories"]]  # fmt: skip
    doc["annotations"] = [
        {**a, "category_id": new_id[a["category_id"]]} for a in doc["annotations"]
    ]
    (tmp_path / "renamed.json").write_text(json.dumps(doc))
    other = RunDir(tmp_path / "other")
    import_source(other, "coco", tmp_path / "renamed.json", "pool", images=images)
    classes = other.class_names()
    assert classes is not None and classes[0] == "question_mark"
    class_map = {w: str(d) for d, w in enumerate(WORDS) if d != 9}

    torch.manual_seed(0)
    model = UncertainEfficientDet(resolve_spec(cfg.model, 10))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_start_weights(model, bundle, "full", classes, class_map)
    source_state = ckpt.load_state_dict(bundle)
    loaded = model.state_dict()
    for key, value in source_state.items():
        if key not in CLASS_KEYS:
            assert torch.equal(loaded[key], value), key
    a = model.num_anchors
    for key in (k for k in CLASS_KEYS if k in source_state):
        src = source_state[key].reshape(a, 10, *source_state[key].shape[1:])
        got = loaded[key].reshape(a, 10, *loaded[key].shape[1:])
        for j, name in enumerate(classes):
            if name == "question_mark":
                want = fresh[key].reshape(a, 10, *fresh[key].shape[1:])[:, j]
            else:
                want = src[:, int(class_map[name])]
            assert torch.equal(got[:, j], want), (key, name)

    model_cfg = {**SETTINGS["model"], "weights": str(bundle), "class_map": class_map}
    settings = {**SETTINGS, "train": {**SETTINGS["train"], "max_steps": 2}, "model": model_cfg}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(settings))
    from detloop.data.pool import PoolState

    pool = PoolState.load(other)
    ids = pool.ids("unlabeled")[:8]
    pool.reveal(other.read_gt(), ids, iteration=0).save(other)
    assert cli("train", str(path), "--run", str(other.path)) == 0
    bad = {**settings, "model": {**settings["model"], "class_map": {"zero": "ten"}}}
    path.write_text(yaml.safe_dump(bad))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli("train", str(path), "--run", str(other.path)) == 2
    assert "mapped to no model class: zero -> ten" in err.getvalue()
