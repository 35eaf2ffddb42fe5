"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and a worker node, each
with its own logical CPUs): predict actors spread over both, custom resources and ``pack``
place them, the shared-storage check asks every node, and an AL loop survives the loss of the
worker node mid-prediction with a complete, duplicate-free predictions table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.config import load_config
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_table
from detloop.data.rundir import RunDir, RunsRoot

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
# 4 images a shard: iteration 1 predicts its 54 unlabeled images in 14 shards, time enough to
# lose a node half-way (both runs use it: shard seeds depend on the sharding)
SHARDS = "ray.shard_size=4"


class TwoNodes:
    """The cluster, its worker node and both node ids."""

    def __init__(self, cluster: Any, worker: Any) -> None:
        self.cluster = cluster
        self.worker = worker
        self.head_id = cluster.head_node.node_id
        self.worker_id = worker.node_id


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    """A head (3 CPUs: the train actor, a predict actor and room for the other one after the
    worker node is lost) and a worker node (2 CPUs, custom resource ``worker_node``); this
    process is their driver."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # another module's local instance
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False}
    )
    worker = cluster.add_node(num_cpus=2, resources={"worker_node": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield TwoNodes(cluster, worker)
    ray.shutdown()
    cluster.shutdown()


class Placements(logging.Handler):
    """The node ids of the predict actors at each pool prediction (the actors' own answer to
    ``PredictWorker.node``, logged by ``engine.actors.Workers``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.nodes: list[list[str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "nodes"):
            self.nodes.append(list(record.nodes))

    def __enter__(self) -> Placements:
        log = logging.getLogger("detloop.orchestrator.engine.actors")
        self._level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log = logging.getLogger("detloop.orchestrator.engine.actors")
        log.removeHandler(self)
        log.setLevel(self._level)


def predictions(run: RunDir) -> Any:
    return read_table(schema.PREDICTIONS, run.predictions_file(1))


@pytest.fixture(scope="module")
def spread_run(
    two_nodes: TwoNodes, digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunDir, list[list[str]]]:
    """configs/ci.yaml (2 iterations, 4 training steps) on both nodes: the run and the node
    ids of its predict actors at each pool prediction."""
    root = tmp_path_factory.mktemp("runs_spread")
    with Placements() as seen:
        assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, root, SHARDS)]) == 0
    return RunsRoot(root).run("ci", "entropy-s0"), seen.nodes


def test_predict_actors_spread_over_both_nodes(
    spread_run: tuple[RunDir, list[list[str]]], two_nodes: TwoNodes
) -> None:
    run, placements = spread_run
    assert run.read_meta()["journal"]["phase"] == "done"
    # iteration 0's evaluation, iteration 1's pool prediction and evaluation
    assert len(placements) == 3
    for nodes in placements:
        assert sorted(nodes) == sorted([two_nodes.head_id, two_nodes.worker_id])


def test_custom_resources_and_pack_place_the_pool(two_nodes: TwoNodes, tmp_path: Path) -> None:
    """``ray.predict_resources`` pins the pool to the nodes that declare the resource;
    ``pack`` puts it on one node; a resource no node has fails at once, naming it."""
    import ray

    from detloop.orchestrator.engine.actors import Workers

    def pool_nodes(*overrides: str) -> list[str]:
        cfg = load_config(CI_CONFIG, [f"runs_root={tmp_path}", *overrides])
        workers = Workers(cfg)
        try:
            return [n for n, _ in ray.get([a.node.remote() for a in workers.predictors])]
        finally:
            workers.shutdown()

    pinned = pool_nodes("ray.predict_resources={worker_node: 1}")
    assert pinned == [two_nodes.worker_id] * 2
    packed = pool_nodes("ray.predict_scheduling=pack")
    assert len(set(packed)) == 1
    with pytest.raises(RuntimeError, match="no single node has gpu_node"):
        pool_nodes("ray.predict_resources={gpu_node: 1}")


def test_every_node_is_asked_for_the_shared_paths(two_nodes: TwoNodes, tmp_path: Path) -> None:
    """The shared-storage check runs one task on each node and names the node that does not
    see a path.

    Both nodes of this test live on one machine, so they share one filesystem: a path that one
    node sees and the other does not cannot be made here honestly (that needs a mount
    namespace per node, i.e. privileges). So the test asks both nodes for a path that exists
    (both answer, each by its own id) and for a path that exists nowhere: each node's own task
    reports it, and the error names both nodes (id and IP) and the path. A node that cannot
    hold any of the loop's actors (demands it lacks) is not asked.
    """
    from detloop.orchestrator.engine.placement import check_shared_storage

    here = [("runs_root", str(tmp_path), True)]
    asked = check_shared_storage(here, force=True)
    assert set(asked) == {two_nodes.head_id, two_nodes.worker_id}
    missing = str(tmp_path / "not-shared")
    with pytest.raises(DataError) as err:
        check_shared_storage([("data.pool.images", missing, False)], force=True)
    message = str(err.value)
    assert len(err.value.problems) == 2
    for node_id, ip in asked.items():
        assert f"{ip} (node {node_id})" in message
    assert f"{missing}: data.pool.images does not exist on Ray node" in message
    only_worker = check_shared_storage(here, [{"CPU": 1, "worker_node": 1}], force=True)
    assert set(only_worker) == {two_nodes.worker_id}


def test_losing_the_worker_node_mid_prediction(
    spread_run: tuple[RunDir, list[list[str]]],
    two_nodes: TwoNodes,
    digits_tiny: Path,
    tmp_path: Path,
) -> None:
    """The worker node is removed (its raylet and every process on it end) once the first
    shard of iteration 1's pool prediction is persisted; its actors restart on the head, the
    shards it held are retried, and the loop ends with the undisturbed run's predictions."""
    reference, _ = spread_run
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    shards = run.shard_dir(1, "predict")
    state: dict[str, Any] = {}

    def remove_worker_node() -> None:
        deadline = time.monotonic() + 600
        while not any(shards.glob("shard_*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        state["shards_before"] = len(list(shards.glob("shard_*.parquet")))
        state["merged_before"] = run.predictions_file(1).exists()
        two_nodes.cluster.remove_node(two_nodes.worker)
        state["removed"] = True

    killer = threading.Thread(target=remove_worker_node, daemon=True)
    killer.start()
    with Placements() as seen:
        assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, tmp_path, SHARDS)]) == 0
    killer.join(timeout=60)
    assert state.get("removed"), "the worker node was not removed"
    assert not state["merged_before"] and state["shards_before"] < 14  # mid-prediction
    assert run.read_meta()["journal"]["phase"] == "done"
    # before: both nodes; after the loss, every predict actor lives on the head
    assert two_nodes.worker_id in seen.nodes[0]
    assert set(seen.nodes[-1]) == {two_nodes.head_id}
    preds, ref = predictions(run), predictions(reference)
    keys = list(zip(preds["image_id"].to_pylist(), preds["det_id"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    assert preds.select(["image_id", "det_id", "class_id"]).equals(
        ref.select(["image_id", "det_id", "class_id"])
    )
    for col in ("score", "x1", "y2", "entropy"):  # float32 noise at most
        np.testing.assert_allclose(preds[col].to_numpy(), ref[col].to_numpy(), rtol=1e-4)
