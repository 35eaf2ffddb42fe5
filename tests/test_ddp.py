"""Data-parallel training (``train.workers > 1``): the rules of ``learners.data_parallel``
without Ray (sharding, BatchNorm over the global batch), then Ray Train for real — two
``TorchTrainer`` workers take the step one worker takes with the same global batch, and an AL
loop whose train worker is killed mid-training completes from the last reported checkpoint
with one MLflow run."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from conftest import ci_overrides
from ddp_ranks import broadcast_rank
from detloop.cli.main import main
from detloop.config import ConfigError, load_config
from detloop.data.io import read_json
from detloop.data.rundir import RunDir, RunsRoot
from detloop.learners.checkpoint import load_state_dict
from detloop.learners.data_parallel import DataParallel, sync_batchnorm
from detloop.learners.model import UncertainEfficientDet, resolve_spec

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
# one SGD step at a large learning rate, no dropout, no warm-up, float32 in the standard
# memory format (torch's CPU BatchNorm backward in channels_last is off by ~1e-3 relative)
ONE_STEP = [
    "model.uncertainty=lossatt",
    "model.channels_last=false",
    "train.optimizer=sgd",
    "train.max_steps=1",
    "train.batch_size=8",
    "train.lr=0.5",
    "train.warmup_epochs=0",
    "train.amp=false",
    "ray.train_num_cpus=1",
]


def test_shards_partition_each_global_batch_labeled_first() -> None:
    batch = [9, 2, 14, 5, 11, 0, 7, 13]  # below 8: labeled; from 8: pseudo-labeled
    shards = [DataParallel(r, 3).shard(batch, n_labeled=8) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(batch)
    for s in shards:
        assert s == sorted(s, key=lambda i: i >= 8)  # the labeled part first
    assert shards[0] == [2, 7, 9, 13] and shards[2] == [0, 11]


def test_config_refuses_what_data_parallel_cannot_run() -> None:
    with pytest.raises(ConfigError, match="each needs at least one image"):
        load_config(CI_CONFIG, ["train.workers=5", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"needs ray\.in_process: false"):
        load_config(CI_CONFIG, ["train.workers=2", "ray.in_process=true"])
    assert load_config(CI_CONFIG, ["train.workers=4"]).train.sync_bn


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A real one-process gloo group (what Ray Train sets up, with one rank)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_is_batchnorm_with_global_statistics(one_rank_group: None) -> None:
    """Converted layers keep their state-dict keys; in training their gradients match a
    float64 model's (torch's own BatchNorm, the reference, is no closer) and their running
    statistics follow torch's update rule."""
    cfg = load_config(CI_CONFIG, ["model.uncertainty=lossatt"])
    torch.manual_seed(0)
    model = UncertainEfficientDet(resolve_spec(cfg.model, 3)).train()
    synced = copy.deepcopy(model)
    assert sync_batchnorm(synced) > 10
    assert list(synced.state_dict()) == list(model.state_dict())
    exact = copy.deepcopy(model).double()
    x = torch.rand(2, 3, *model.spec.image_size) * 2 - 1

    def grads(m: torch.nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        cls_maps, box_maps = m(inputs)
        flat = torch.cat([t.flatten() for t in [*cls_maps, *box_maps]])
        weights = torch.linspace(-1, 1, flat.numel(), dtype=flat.dtype)
        (flat.sigmoid() * weights).sum().backward()
        return {k: p.grad.double() for k, p in m.named_parameters() if p.grad is not None}

    def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        num = sum(float((a[k] - b[k]).square().sum()) for k in b)
        return (num / sum(float(v.square().sum()) for v in b.values())) ** 0.5

    ref = grads(exact, x.double())
    assert rel(grads(synced, x), ref) < 2e-5
    assert rel(grads(model, x), ref) < 2e-5
    for key, value in model.state_dict().items():
        if "running" in key:
            np.testing.assert_allclose(synced.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_rank_zeros_decision_reaches_every_rank(tmp_path: Path) -> None:
    """Early stopping and the plateau schedule's drops are rank 0's: two real gloo ranks,
    rank 0 holding (True, 2) and rank 1 (False, 0), both get (True, 2)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(broadcast_rank, args=(port, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["(True, 2)"] * 2


def _first_images(run: RunDir, n: int) -> tuple[pa.Table, pa.Table]:
    images = run.read_images()
    pool = images.filter(pc.equal(images["split"], "pool")).slice(0, n)
    labels = run.read_labels()
    return pool, labels.filter(pc.is_in(labels["image_id"], pool["image_id"]))


def _update_gap(out: Path, cfg_model: object, a: str, b: str) -> float:
    """‖Δw_a − Δw_b‖ / ‖Δw_a‖ over the parameters of two one-step trainings."""
    torch.manual_seed(0)
    w0 = UncertainEfficientDet(resolve_spec(cfg_model, 10)).state_dict()  # type: ignore[arg-type]
    wa, wb = load_state_dict(out / a), load_state_dict(out / b)
    num = den = 0.0
    for key, start in w0.items():
        if not start.is_floating_point() or "running" in key:
            continue
        da, db = (wa[key] - start).double(), (wb[key] - start).double()
        num += float((da - db).square().sum())
        den += float(da.square().sum())
    return (num / den) ** 0.5


@pytest.mark.ray
@pytest.mark.slow
def test_two_torchtrainer_workers_take_the_step_of_one(
    local_ray: str, digits_tiny_run: RunDir, tmp_path: Path
) -> None:
    """Same global batch of 8: one worker in this process, two Ray Train workers of 4 images
    each; the first update agrees to float32 noise (the sharded normaliser and the synced
    BatchNorm make it the same gradient). Only rank 0 wrote a checkpoint."""
    from detloop.orchestrator.engine.ray_train import train_data_parallel
    from detloop.orchestrator.engine.workers import TrainJob, run_train_job

    images, labels = _first_images(digits_tiny_run, 16)
    one = load_config(CI_CONFIG, ONE_STEP)
    two = load_config(CI_CONFIG, [*ONE_STEP, "train.workers=2"])
    run_train_job(one, TrainJob(images, labels, 10, str(tmp_path / "one"), seed=0), False)
    outcome = train_data_parallel(two, TrainJob(images, labels, 10, str(tmp_path / "two"), seed=0))
    assert outcome.steps == 1 and outcome.checkpoint == tmp_path / "two"
    assert np.isfinite(outcome.final_loss)
    assert _update_gap(tmp_path, one.model, "one", "two") < 1e-4
    assert not (tmp_path / "two.partial").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_train_worker_resumes_from_the_last_checkpoint(
    local_ray: str, digits_tiny: Path, tmp_path: Path
) -> None:
    """An AL loop training with two Ray Train workers (32 labeled images, 4 steps an epoch, a
    checkpoint each epoch), the last worker killed after step 6: the worker group restarts
    from step 4, the loop completes (evaluation predicts with the model) and MLflow holds one
    run."""
    sets = ["al.iterations=1", "al.al_budgets=[50,10]", "train.workers=2", "train.batch_size=8",
            "train.epochs=4", "train.max_steps=16", "train.save_freq=1",
            "fault.kill_train_worker_at_step=6", "ray.predict_workers=1"]  # fmt: skip
    assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, tmp_path, *sets)]) == 0
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    assert run.read_meta()["journal"]["phase"] == "done"
    assert (run.path / ".fault_train_worker").is_file(), "the fault did not fire"
    history = read_json(run.checkpoint(0) / "metadata.json")["history"]
    assert [h["step"] for h in history] == [4.0, 8.0, 12.0, 16.0]  # each epoch once
    assert history[-1]["loss"] < history[0]["loss"]
    assert not list((run.iteration_dir(0) / "ray_train").glob("*/checkpoint_*"))  # cleaned up
    metrics = read_json(run.metrics_file(0))  # the checkpoint loaded into the predictor
    assert (run.iteration_dir(0) / "val_predictions.parquet").is_file() and "map" in metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=RunsRoot(tmp_path).tracking_uri)
    experiment = client.get_experiment_by_name("ci")
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == 1
