"""Grids, the human labeling path, and `ray job submit` against a `ray start` cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pytest

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.data import schema
from detloop.data.io import read_table
from detloop.data.rundir import RunDir, RunsRoot

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"


def selections(run: RunDir) -> list[list[str]]:
    out = []
    for it in run.iterations():
        sel = read_table(schema.SELECTION, run.selection_file(it))
        out.append(sorted(sel.filter(sel["selected"])["image_id"].to_pylist()))
    return out


def test_grid_two_strategies_share_the_warmup(
    digits_tiny: Path, tmp_path: Path, local_ray: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ci_overrides(digits_tiny, tmp_path, "ray.predict_workers=1")
    code = main(["grid", str(CI_CONFIG), "--strategies", "random,entropy", "--seeds", "0", *args])
    assert code == 0
    root = RunsRoot(tmp_path)
    runs = {r.name: r for r in root.runs_of("ci")}
    assert set(runs) == {"random-s0", "entropy-s0"}
    sel = {name: selections(run) for name, run in runs.items()}
    assert sel["random-s0"][0] == sel["entropy-s0"][0]  # one warm-up for both
    hits = [
        h.get("warmup_cache", False)
        for run in runs.values()
        for h in run.read_meta()["history"]
        if h["iteration"] == 0 and h["phase"] == "train"
    ]
    assert hits.count(True) == 1
    for run in runs.values():
        assert run.read_meta()["journal"]["phase"] == "done"
    capsys.readouterr()
    assert main(["report", "--experiment", "ci", "--runs-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "entropy" in out
    assert (root.experiment("ci") / "al_curves.png").exists()


def _answer_query(run: RunDir, iteration: int, out: Path) -> Path:
    """A person labels the exported query: the exported COCO with ground-truth boxes."""
    doc = json.loads((run.exports / f"query_iter_{iteration:04d}.coco.json").read_text())
    gt = run.read_gt().to_pandas()
    by_id = {img["detloop_id"]: img["id"] for img in doc["images"]}
    anns = []
    for r in gt[gt["image_id"].isin(list(by_id))].itertuples():
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": by_id[r.image_id],
                "category_id": int(r.class_id) + 1,
                "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1],
                "area": (r.x2 - r.x1) * (r.y2 - r.y1),
                "iscrowd": 0,
            }
        )
    doc["annotations"] = anns
    doc["categories"] = [{"id": k + 1, "name": str(k)} for k in range(10)]
    out.write_text(json.dumps(doc))
    return out


def test_human_labeling_path(digits_tiny: Path, tmp_path: Path, local_ray: str) -> None:
    args = ci_overrides(digits_tiny, tmp_path / "runs", "al.oracle=human")
    assert main(["run", str(CI_CONFIG), *args]) == 0
    run = RunsRoot(tmp_path / "runs").run("ci", "entropy-s0")
    for iteration in (0, 1):
        meta = run.read_meta()
        assert meta["journal"] == {
            "iteration": iteration,
            "phase": "wait_for_labels",
            "status": "started",
        }
        assert (run.exports / f"query_iter_{iteration:04d}.label_studio.json").exists()
        images = run.read_images()
        queried = images.filter(pc.equal(images["state"], "queried"))["image_id"].to_pylist()
        assert sorted(queried) == selections(run)[iteration]
        labels = _answer_query(run, iteration, tmp_path / f"labels_{iteration}.json")
        assert main(["import-labels", str(run.path), str(labels)]) == 0
        assert main(["resume", str(run.path)]) == 0
    assert run.read_meta()["journal"]["phase"] == "done"
    lab = run.read_labels()
    assert set(lab["source"].to_pylist()) == {"human"}  # people labeled them, not the oracle
    assert set(lab["image_id"].to_pylist()) <= {i for s in selections(run) for i in s}


def test_import_labels_rejects_a_run_that_is_not_waiting(
    digits_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_meta({"journal": None})
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["import-labels", str(run.path), str(bad)]) == 2
    assert "not waiting for labels" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ray_job_submit(digits_tiny: Path, tmp_path: Path) -> None:
    """`ray start --head`, `ray job submit --working-dir .` of `detloop run`, `ray stop`."""
    import ray

    ray.shutdown()  # `ray stop` ends every Ray process of this machine
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port, dash = _free_port(), _free_port()
    start = [str(bindir / "ray"), "start", "--head", "--num-cpus", "2", "--temp-dir", temp]
    start += ["--port", str(port), "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    runs_root = tmp_path / "runs"
    try:
        submit = [
            str(bindir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
            "--working-dir", str(REPO), "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"),
            "--", "detloop", "run", "configs/ci.yaml",
            *ci_overrides(digits_tiny, runs_root, "ray.predict_workers=1",
                  f"tracking.uri={RunsRoot(runs_root).tracking_uri}"),
        ]  # fmt: skip
        res = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "succeeded" in (res.stdout + res.stderr).lower()
    finally:
        subprocess.run(
            [str(bindir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(temp, ignore_errors=True)
    run = RunsRoot(runs_root).run("ci", "entropy-s0")
    assert run.read_meta()["journal"]["phase"] == "done"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=RunsRoot(runs_root).tracking_uri)
    exp = client.get_experiment_by_name("ci")
    assert exp is not None
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1
    assert found[0].data.tags.get("ray_job_id")
