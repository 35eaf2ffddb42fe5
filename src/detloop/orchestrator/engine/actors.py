"""The only place that calls ``ray.remote``: workers become actors with configured resources.

Also owns connecting to Ray (local instance, ``ray start`` cluster or a ``ray job submit``
driver) and sharding a table over a pool of predict actors.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

from detloop import console
from detloop.config import ExperimentConfig, RayConfig, config_snapshot
from detloop.orchestrator.engine.placement import (
    check_cluster,
    describe_node,
    driver_node_strategy,
    predict_strategies,
    remove_group,
)
from detloop.orchestrator.engine.progress import ProgressBoard, forget, new_prefix
from detloop.orchestrator.engine.workers import (
    PredictJob,
    PredictWorker,
    ShardResult,
    TrainJob,
    TrainOutcome,
    TrainWorker,
)
from detloop.orchestrator.engine.workers import Workers as WorkersProtocol
from detloop.runtime_env import apply_local_env

logger = logging.getLogger(__name__)
A = TypeVar("A")
R = TypeVar("R")


def _threads(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))


def loop_cpus(rc: RayConfig, train_workers: int = 1) -> float:
    """Logical CPUs one loop's actors hold (train + predict workers live side by side;
    ``train.workers`` Ray Train workers each hold ``train_num_cpus``)."""
    return train_workers * rc.train_num_cpus + rc.predict_workers * rc.predict_num_cpus


def ensure_ray(rc: RayConfig, loops: int = 1, train_workers: int = 1) -> None:
    """Connect to Ray unless already connected.

    ``address`` None starts a local instance on loopback sized so that ``loops`` loops can
    hold their actors at once (actors of one loop never compute at the same time, so logical
    CPUs may exceed physical cores); ``"auto"`` joins a ``ray start`` cluster or the cluster of
    a ``ray job submit`` driver.
    """
    apply_local_env()
    if ray.is_initialized():
        return
    # Ray's own info lines ("Started a local Ray instance.") only when detloop's are shown (-v)
    level = logging.INFO if logger.isEnabledFor(logging.INFO) else logging.WARNING
    if rc.address or os.environ.get("RAY_ADDRESS"):  # a cluster, or a `ray job submit` driver
        check_reachable(rc.address)
        ray.init(address=rc.address, log_to_driver=True, logging_level=level)
    else:
        need = math.ceil(loop_cpus(rc, train_workers) * loops)
        num_cpus = max(rc.num_cpus or 0, need, os.cpu_count() or 1)
        ray.init(  # "local": a new instance even when a `ray start` cluster runs here
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=level,
        )
    logger.info("ray resources: %s", cluster_resources())


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the address, when nothing listens at a ``host:port`` Ray
    address (``ray.init`` would wait minutes for a GCS that is not there). ``None``, ``auto``
    and ``ray://`` client addresses are left to Ray.

    Raises:
        ConnectionError: no server accepts a connection at ``address``.
    """
    if not address or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"ray.address {address}: no Ray cluster answers there ({err.strerror or err}); "
            "start one with `ray start --head`, or leave ray.address unset for a local instance"
        ) from err


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected cluster."""
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return resources


def check_capacity(rc: RayConfig, loops: int = 1, train_workers: int = 1) -> None:
    """Fail early, with the settings to change, if the cluster cannot hold the actors."""
    have = float(cluster_resources().get("CPU", 0.0))
    need = loop_cpus(rc, train_workers) * loops
    if need > have + 1e-9:
        raise RuntimeError(
            f"the Ray cluster has {have:g} CPUs but {loops} loop(s) need {need:g} "
            "(train.workers * ray.train_num_cpus + ray.predict_workers * ray.predict_num_cpus "
            "each); lower those settings or add CPUs"
        )


def coordinator_tasks(fn: Callable[[A], R], args: Sequence[A]) -> list[R]:
    """Run ``fn`` on each argument as a Ray task that holds no CPU (it only waits on actors,
    so coordinators never starve behind training actors) and is not retried (a loop resumes
    from its journal instead); results in argument order.

    The tasks run on the driver's node (a coordinator writes the run directory and drives its
    loop like the driver of ``detloop run``): on a cluster of several nodes, losing a worker
    node then takes only actors with it, which Ray restarts elsewhere.
    """
    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=driver_node_strategy()
    )
    return list(ray.get([task.remote(a) for a in args]))


class Workers(WorkersProtocol):
    """One loop's actors: a train actor and a pool of predict actors, created lazily
    (the ``engine.workers.Workers`` protocol on Ray).

    When this process shows progress (``detloop.console.mode()``), each actor publishes its
    bar under a key of this loop and the calls below draw them while they wait
    (``orchestrator/progress.py``): one line for the trainer, one per predict actor.

    Placement (``placement.py``): the actors hold ``ray.*_resources`` besides their CPUs and
    GPUs, the predict actors are spread over the nodes (``ray.predict_scheduling``), and on a
    cluster of several nodes the constructor checks that the nodes see the run's paths.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.rc = cfg.ray
        self._config = config_snapshot(cfg)
        self._trainer: Any = None
        self._predictors: list[Any] = []
        self._progress = console.mode()
        self._prefix = new_prefix() if self._progress != "off" else None
        self._group: Any = None  # the predict actors' placement group (``pack``)
        # (node id, IP) of each predict actor when the last prediction started
        self.placement: list[tuple[str, str]] = []
        check_cluster(cfg)

    def _key(self, role: str) -> str | None:
        """The progress key of an actor (None: progress is off)."""
        return f"{self._prefix}/{role}" if self._prefix else None

    def _options(
        self, num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None
    ) -> dict[str, Any]:
        return {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": dict(resources or {}),
            "max_restarts": self.rc.max_restarts,
            "max_task_retries": self.rc.max_task_retries,
        }

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            rc = self.rc
            opts = self._options(rc.train_num_cpus, rc.train_num_gpus, rc.train_resources)
            cls = ray.remote(**opts)(TrainWorker)
            threads = self.cfg.train.torch_threads or _threads(self.rc.train_num_cpus)
            self._trainer = cls.remote(self._config, threads, self._key("train"))
        return self._trainer

    @property
    def predictors(self) -> list[Any]:
        if not self._predictors:
            rc = self.rc
            opts = self._options(rc.predict_num_cpus, rc.predict_num_gpus, rc.predict_resources)
            cls = ray.remote(**opts)(PredictWorker)
            threads = _threads(rc.predict_num_cpus)
            where, self._group = predict_strategies(rc, rc.predict_workers)
            self._predictors = [
                cls.options(**where[i]).remote(self._config, threads, self._key(f"predict{i}"))
                for i in range(rc.predict_workers)
            ]
        return self._predictors

    def start(self) -> None:
        """Create every actor now; they start up while the driver does other work (a
        data-parallel training starts its Ray Train workers when it runs)."""
        if self.cfg.train.workers == 1:
            _ = self.trainer
        _ = self.predictors

    def _board(self, roles: dict[str, str], cumulative: bool = False) -> ProgressBoard:
        """The progress lines of ``roles`` (role: label) while the driver waits on them."""
        labels = {key: label for role, label in roles.items() if (key := self._key(role))}
        return ProgressBoard(labels, mode=self._progress, cumulative=cumulative)

    def train(self, job: TrainJob) -> TrainOutcome:
        """Train in the train actor, or with ``train.workers > 1`` through Ray Train."""
        with self._board({"train": "train"}):
            if self.cfg.train.workers > 1:
                from detloop.orchestrator.engine.ray_train import train_data_parallel

                return train_data_parallel(self.cfg, job, self._key("train"))
            ref = self.trainer.train.remote(job)
            result: TrainOutcome = ray.get(ref)
        return result

    def predict(
        self,
        job: PredictJob,
        on_result: Callable[[ShardResult], None],
        fault_marker: Callable[[int], str | None] | None = None,
    ) -> float:
        """Predict the job's shards over the actor pool.

        The weights go into the object store once; each finished shard is handed to
        ``on_result`` as it arrives (the loop persists it, so a crash loses at most the shards
        in flight). Returns the compute makespan: the largest per-actor sum of shard seconds
        (actors work in parallel, so their sums overlap in wall time).
        """
        if not job.shards:
            return 0.0
        weights_ref = ray.put(job.weights)
        actors = self.predictors
        nodes = [a.node.remote() for a in actors]  # answered before each actor's first shard
        pending: dict[Any, int] = {}
        queue = list(job.shards)
        busy = [0.0] * len(actors)
        roles = {f"predict{i}": f"predict (worker {i + 1})" for i in range(len(actors))}
        board = self._board(roles, cumulative=True)

        def submit(actor_idx: int) -> None:
            sid, table, seed = queue.pop(0)
            board.assign(self._key(f"predict{actor_idx}"), table.num_rows)
            marker = fault_marker(sid) if fault_marker else None
            ref = actors[actor_idx].predict_shard.remote(
                job.key, weights_ref, job.num_classes, sid, table, seed, marker
            )
            pending[ref] = actor_idx

        with board:
            for idx in range(min(len(actors), len(queue))):
                submit(idx)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                actor_idx = pending.pop(ref)
                result: ShardResult = ray.get(ref)
                busy[actor_idx] += result.seconds
                on_result(result)
                if queue:
                    submit(actor_idx)
        self._log_placement(nodes)
        return max(busy)

    def _log_placement(self, refs: list[Any]) -> None:
        """Record and log the nodes the predict actors started the last prediction on."""
        try:
            self.placement = [tuple(n) for n in ray.get(refs, timeout=10)]
        except ray.exceptions.RayError:  # an actor lost since: placement unknown, nothing lost
            self.placement = []
            return
        hosts = sorted({describe_node(node_id, ip) for node_id, ip in self.placement})
        logger.info(
            "predict workers: %d on %d node(s): %s",
            len(self.placement),
            len(hosts),
            "; ".join(hosts),
            extra={"nodes": [node_id for node_id, _ in self.placement]},
        )

    def shutdown(self) -> None:
        for actor in [self._trainer, *self._predictors]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self._trainer = None
        self._predictors = []
        remove_group(self._group)
        self._group = None
        if self._prefix:
            forget(self._prefix)
