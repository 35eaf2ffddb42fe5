"""``AutoLabelRun`` end to end on digits-det tiny, in-process (``ray.in_process``): a real AL
run's model auto-labels the test split in a run of its own (states, auto-labels, exports,
MLflow), the AL run is left byte-identical, a driver SIGKILLed at every phase boundary
resumes to the same verdicts, and ``autolabel.after_loop`` chains it after an AL run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.data import schema
from detloop.data.digits import digits_source
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir, RunsRoot

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
SCHEMA = json.loads((Path(__file__).parent / "fixtures/label_studio_tasks.schema.json").read_text())
FAST = [
    "ray.in_process=true",
    "train.max_steps=30",
    "thresholding.n_trials=12",
    "thresholding.patience=6",
    "model.mc_dropoutsamp=2",
    "tracking.enabled=true",
]


def cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(list(argv))


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def frames_args(data: Path) -> list[str]:
    """The test split as the frames (with ground truth, so the auto-labels are measured)."""
    out = []
    for split, key in (("test", "pool"), ("val", "val")):
        source, images = digits_source(data, split)
        out += ["--set", f"data.{key}.source={source}", "--set", f"data.{key}.images={images}"]
    return out


@pytest.fixture(scope="module")
def al_run(digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    """A finished one-iteration AL run (its warm-up model) and its runs root."""
    root = tmp_path_factory.mktemp("al") / "runs"
    argv = ["run", str(CI_CONFIG), *ci_overrides(digits_tiny, root, *FAST, "al.iterations=1")]
    assert cli(*argv) == 0
    return root, RunsRoot(root).run("ci", "entropy-s0")


@pytest.mark.slow
def test_autolabel_run_end_to_end_leaves_the_model_run_untouched(
    al_run: tuple[Path, RunDir], digits_tiny: Path
) -> None:
    root, source = al_run
    before = digests(source.path)
    sets = [a for v in FAST for a in ("--set", v)]
    argv = ["autolabel", str(CI_CONFIG), "--run", str(source.path), *frames_args(digits_tiny)]
    assert cli(*argv, "--set", f"runs_root={root}", *sets) == 0
    assert digests(source.path) == before  # read, never written

    run = RunsRoot(root).run("ci", "autolabel-s0")
    meta = run.read_meta()
    assert meta["kind"] == "autolabel" and meta["journal"]["phase"] == "done"
    phases = [(h["iteration"], h["phase"]) for h in meta["history"]]
    assert phases == [(0, "import"), (0, "evaluate"), (1, "predict"), (1, "calibrate"),
                      (1, "threshold"), (1, "decide"), (1, "export"), (1, "log"),
                      (1, "done")]  # fmt: skip
    # the model is the AL run's, installed as checkpoint 0 with its classes
    assert (run.checkpoint(0) / "classes.json").is_file()
    sel = read_table(schema.SELECTION, run.selection_file(1))
    assert sel.num_rows == 32  # every test image is a frame
    images = run.read_images().to_pandas().set_index("image_id")
    verdicts = dict(zip(sel["image_id"].to_pylist(), sel["verdict"].to_pylist(), strict=True))
    assert all(images.loc[i, "state"] == v for i, v in verdicts.items())
    labels = run.read_labels().to_pandas()
    assert set(labels["source"]) <= {"auto"}
    assert set(labels["image_id"]) <= {i for i, v in verdicts.items() if v == "auto_labeled"}
    report = read_json(run.metrics_file(1))
    assert report["autolabel"]["quality"]["n_images"] == 32  # the frames have ground truth
    assert 0 <= report["autolabel_share"] <= 1 and "autolabel_weight_entropy" in report
    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(run.autolabel_coco_file(1)))
        COCO(f"{run.autolabel_examine_stem(1)}.coco.json")
    import jsonschema

    jsonschema.validate(
        read_json(Path(f"{run.autolabel_examine_stem(1)}.label_studio.json")), SCHEMA
    )
    # one MLflow run, with the auto-labeling's numbers and exports
    import mlflow

    client = mlflow.MlflowClient(RunsRoot(root).tracking_uri)
    tracked = client.get_run(meta["mlflow_run_id"])
    assert tracked.info.status == "FINISHED" and tracked.data.tags["loop"] == "autolabel"
    assert {"autolabel_share", "autolabel_image_precision", "map"} <= set(tracked.data.metrics)
    logged = {a.path for a in client.list_artifacts(tracked.info.run_id, "iter_0001")}
    assert "iter_0001/autolabel_iter_0001_auto.coco.json" in logged

    # the whole labeled dataset: auto-labeled frames with provenance, val with its gt
    out = root / "dataset.json"
    assert cli("export", "coco", str(run.path), "--out", str(out)) == 0
    doc = json.loads(out.read_text())
    kinds = {a["detloop_source"] for a in doc["annotations"]}
    assert kinds <= {"auto", "gt"} and "gt" in kinds
    n_auto = sum(v == "auto_labeled" for v in verdicts.values())
    assert len(doc["images"]) == n_auto + 32  # + the validation split


def test_autolabel_refuses_what_it_cannot_run(al_run: tuple[Path, RunDir], tmp_path: Path) -> None:
    """A config whose model section does not describe the model, frames that do not exist,
    no model at all: each a clear error, exit 2, no traceback."""
    _, source = al_run
    err = io.StringIO()
    common = [str(CI_CONFIG), "--run", str(source.path), "--set", f"runs_root={tmp_path}"]
    with contextlib.redirect_stderr(err):
        assert cli("autolabel", *common, "--images", str(tmp_path / "nope")) == 2
        assert cli("autolabel", str(CI_CONFIG), "--iteration", "0") == 2
        assert cli("autolabel", str(CI_CONFIG), "--set", "loop=autolabel") == 2
    text = err.getvalue()
    assert "is not a directory" in text and "--iteration needs --run" in text
    assert "autolabel.model" in text and "Traceback" not in text


def test_a_missing_input_inside_a_run_is_exit_2_and_resumable(
    al_run: tuple[Path, RunDir], digits_tiny: Path, tmp_path: Path
) -> None:
    """A data file that is not there when the run reads it (here the validation split) stops
    the run with exit 2, the file named, no traceback, and the command that continues it."""
    _, source = al_run
    missing = tmp_path / "val.json"
    frames = str(digits_tiny / "images" / "test")
    sets = [f"runs_root={tmp_path}", f"data.val.source={missing}", *FAST]
    argv = ["autolabel", str(CI_CONFIG), "--run", str(source.path), "--images", frames,
            *[a for v in sets for a in ("--set", v)]]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(*argv) == 2
    text = err.getvalue()
    assert f"{missing}: file does not exist" in text and "Traceback" not in text
    assert "detloop resume" in text and (tmp_path / "ci" / "autolabel-s0" / "run.json").is_file()


def _driver(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "detloop.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_at_phase_boundaries_resumes_to_the_same_verdicts(
    al_run: tuple[Path, RunDir], digits_tiny: Path, tmp_path: Path
) -> None:
    """A driver SIGKILLed after phases of both iterations (and once mid-prediction) resumes to
    the verdicts, labels and selection of an uninterrupted run."""
    _, source = al_run
    images = str(digits_tiny / "images" / "test")
    val_source, val_images = digits_source(digits_tiny, "val")  # not ci.yaml's (not built in CI)
    base = ["autolabel", str(CI_CONFIG), "--run", str(source.path), "--images", images,
            "--first", "4", "--last", "20", *[a for v in FAST for a in ("--set", v)],
            "--set", f"data.val.source={val_source}", "--set", f"data.val.images={val_images}",
            "--set", "tracking.enabled=false", "--set", "ray.shard_size=4"]  # fmt: skip
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    ref_run = _driver([*base, "--set", f"runs_root={ref_root}"])
    assert ref_run.returncode == 0, ref_run.stderr[-3000:]
    # after a phase of each kind (the journal's record) and once mid-phase (its idempotency):
    # every boundary costs a driver start, so not all of them
    kills = ["0:evaluate", "1:predict:mid", "1:calibrate", "1:decide"]
    argv = [*base, "--set", f"runs_root={root}", "--set", f"fault.kill_at=[{','.join(kills)}]"]
    first = _driver(argv)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    run = RunsRoot(root).run("ci", "autolabel-s0")
    for _ in kills[1:]:
        assert _driver(["resume", str(run.path)]).returncode == -signal.SIGKILL
    done = _driver(["resume", str(run.path)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "auto-labeling with the model of iteration 0: 16 frames" in done.stdout
    ref = RunsRoot(ref_root).run("ci", "autolabel-s0")
    ours = read_table(schema.SELECTION, run.selection_file(1))
    assert ours.num_rows == 16 and ours.equals(read_table(schema.SELECTION, ref.selection_file(1)))
    assert run.read_labels().equals(ref.read_labels())
    states = run.read_images().select(["image_id", "state", "reason"])
    assert states.equals(ref.read_images().select(["image_id", "state", "reason"]))


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["al", "ssl"])
def test_after_loop_auto_labels_the_rest_of_the_pool(
    loop: str, digits_tiny: Path, tmp_path: Path
) -> None:
    """``autolabel.after_loop`` on the CI config: the final model splits what is left of the
    pool into auto_labeled and examine; ``export coco`` then writes the labeled dataset with
    the provenance of every box."""
    root = tmp_path / "runs"
    extra = [*FAST, "al.iterations=1", "autolabel.after_loop=true", "tracking.enabled=false"]
    if loop == "ssl":
        extra += ["loop=ssl", "ssl.portion_labeled=20", "ssl.selection_strategy=score"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, root, *extra)]) == 0
    name = "entropy-s0" if loop == "al" else "ssl-score-s0"
    run = RunsRoot(root).run("ci", name)
    last = 1 if loop == "al" else 2  # AL: iteration 0 (+1); SSL: teacher, student (+1)
    history = [(h["iteration"], h["phase"]) for h in run.read_meta()["history"]]
    assert history[-5:] == [(last, p) for p in ("threshold", "decide", "export", "log", "done")]
    sel = read_table(schema.SELECTION, run.selection_file(last))
    images = run.read_images().to_pandas()
    pool = images[images["split"] == "pool"]
    left = pool[pool["state"].isin(["auto_labeled", "examine"])]
    assert sorted(left["image_id"]) == sorted(sel["image_id"].to_pylist())
    assert len(left) + (pool["state"] == "labeled").sum() == len(pool)  # nothing else is left
    assert "auto-labeling with the model of iteration" in out.getvalue()
    dataset = tmp_path / "dataset.json"
    assert cli("export", "coco", str(run.path), "--out", str(dataset)) == 0
    doc = json.loads(dataset.read_text())
    kinds = {a["detloop_source"] for a in doc["annotations"]}
    assert {"oracle", "gt"} <= kinds <= {"oracle", "gt", "auto"}
    n_labeled = int((pool["state"].isin(["labeled", "auto_labeled"])).sum())
    assert len(doc["images"]) == n_labeled + int((images["split"] == "val").sum())
