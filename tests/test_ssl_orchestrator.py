"""The semi-supervised loop end to end: real Ray on loopback, real MLflow (SQLite), the tiny
model on digits-det tiny. The driver is SIGKILLed at a phase boundary and mid-training of the
student, then `detloop resume` must end with the pseudo-labels and labeled set of an
uninterrupted run. And `al.ssl: true`: two AL iterations whose second model is a student."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.data.io import read_json
from detloop.data.rundir import RunDir, RunsRoot
from detloop.learners.checkpoint import load_state_dict, read_metadata

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
#: an SSL run of configs/ci.yaml: 25 % labeled, one self-training round; the 4-step teacher
#: scores low, so τ = 0 and at most 3 pseudo-labels per image make pseudo-labels certain
SSL = (
    "loop=ssl",
    "ssl.portion_labeled=25",
    "ssl.selection_strategy=selftrain_score",
    "ssl.selftrain_rounds=1",
    "ssl.selftrain_epochs=1",
    "ssl.tau=0.0",
    "ssl.teacher_min_score=0.0",
    "ssl.max_per_image=3",
)


def pseudo_rows(run: RunDir) -> list[tuple[str, int, int, float]]:
    labels = run.read_labels()
    labels = labels.filter(pc.equal(labels["source"], "pseudo"))
    cols = [labels[c].to_pylist() for c in ("image_id", "class_id", "iteration", "x1")]
    return sorted(zip(*cols, strict=True))


def labeled(run: RunDir) -> list[str]:
    images = run.read_images()
    return sorted(images.filter(pc.equal(images["state"], "labeled"))["image_id"].to_pylist())


@pytest.fixture(scope="module")
def ssl_reference(
    digits_tiny: Path, local_ray: str, tmp_path_factory: pytest.TempPathFactory
) -> RunDir:
    root = tmp_path_factory.mktemp("ssl_ref")
    args = ci_overrides(digits_tiny, root, f"ray.address={local_ray}", *SSL)
    assert main(["run", str(CI_CONFIG), *args]) == 0
    return RunsRoot(root).run("ci", "ssl-selftrain_score+tau0-s0")


def test_ssl_run_end_to_end(ssl_reference: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    run = ssl_reference
    meta = run.read_meta()
    assert meta["kind"] == "ssl" and meta["journal"]["phase"] == "done"
    assert run.iterations() == [0, 1, 2]
    rows = pseudo_rows(run)
    assert {r[2] for r in rows} == {1, 2} and not {r[0] for r in rows} & set(labeled(run))
    student = read_metadata(run.checkpoint(1))
    assert all("unsup_loss" in h and "sup_loss" in h for h in student["history"])
    assert "unsup_loss" not in read_metadata(run.checkpoint(0))["history"][-1]
    m1 = read_json(run.metrics_file(1))
    for key in ("map", "pseudo_label_pseudo_labels", "pseudo_label_pseudo_precision"):
        assert key in m1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=RunsRoot(run.path.parents[1]).tracking_uri)
    exp = client.get_experiment_by_name("ci")
    assert exp is not None
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.data.tags["loop"] == "ssl" and mlrun.info.run_name == run.name
    assert {"student_unsup_loss", "student_sup_loss", "pseudo_label_pseudo_recall"} <= set(
        mlrun.data.metrics
    )
    assert len(client.get_metric_history(mlrun.info.run_id, "map")) == 3


def _driver(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "detloop.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_ssl_sigkill_and_resume(
    ssl_reference: RunDir, digits_tiny: Path, local_ray: str, tmp_path: Path
) -> None:
    kills = ["1:pseudo_label", "1:train:mid"]
    args = ci_overrides(
        digits_tiny,
        tmp_path,
        f"ray.address={local_ray}",
        *SSL,
        f"fault.kill_at=[{','.join(kills)}]",
    )
    first = _driver(["run", str(CI_CONFIG), *args])
    assert first.returncode == -9, first.stderr[-2000:]
    run = RunsRoot(tmp_path).run("ci", "ssl-selftrain_score+tau0-s0")
    second = _driver(["resume", str(run.path)])
    assert second.returncode == -9, second.stderr[-2000:]
    assert (run.checkpoint(1).with_name(run.checkpoint(1).name + ".partial")).exists()
    final = _driver(["resume", str(run.path)])
    assert final.returncode == 0, final.stderr[-3000:]
    assert "student" in final.stdout
    assert pseudo_rows(run) == pseudo_rows(ssl_reference)
    assert labeled(run) == labeled(ssl_reference)
    # the student resumed from its partial checkpoint: the same steps, the same weights
    assert (
        read_metadata(run.checkpoint(1))["steps"]
        == read_metadata(ssl_reference.checkpoint(1))["steps"]
    )
    got, ref = load_state_dict(run.checkpoint(1)), load_state_dict(ssl_reference.checkpoint(1))
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)


def test_al_with_ssl_runs_two_iterations(digits_tiny: Path, local_ray: str, tmp_path: Path) -> None:
    extra = ("al.ssl=true", "ssl.tau=0.0", "ssl.teacher_min_score=0.0", "ssl.max_per_image=2")
    args = ci_overrides(digits_tiny, tmp_path, f"ray.address={local_ray}", *extra)
    assert main(["run", str(CI_CONFIG), *args]) == 0
    run = RunsRoot(tmp_path).run("ci", "entropy+ssl_score-s0")  # beside entropy-s0 in a grid
    assert run.iterations() == [0, 1]
    rows = pseudo_rows(run)
    assert rows and {r[2] for r in rows} == {1}
    assert not {r[0] for r in rows} & set(labeled(run))  # pseudo-labels on unlabeled images
    assert "unsup_loss" in read_metadata(run.checkpoint(1))["history"][-1]
    assert "unsup_loss" not in read_metadata(run.checkpoint(0))["history"][-1]
    m1 = read_json(run.metrics_file(1))
    assert m1["train_pseudo_labels"] == len(rows) and "train_pseudo_precision" in m1
