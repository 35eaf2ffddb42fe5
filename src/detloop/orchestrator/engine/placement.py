"""Where a loop's actors and tasks go on a Ray cluster of one or several nodes.

- ``predict_strategies``: the scheduling option of each predict actor (``ray.predict_scheduling``:
  Ray's ``SPREAD`` strategy, one ``PACK`` placement group, or Ray's default; one node: always
  the default).
- ``check_feasible``: every actor's resources (CPUs, GPUs, ``ray.*_resources``) fit on some
  node, else an error naming the resource (Ray would leave the actor pending forever).
- ``check_shared_storage``: on a cluster of several nodes, every alive node that can hold one
  of the loop's actors sees ``runs_root`` and the data paths (one ``num_cpus=0`` task pinned
  to each node), else a ``DataError`` naming the node (IP and id) and the path.
- ``driver_node_strategy``: pins the grid's coordinator tasks to the driver's node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util import get_node_ip_address, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from detloop.config import ExperimentConfig, RayConfig
from detloop.data.errors import DataError

logger = logging.getLogger(__name__)

#: (config key, absolute path, whether the workers write there)
StoragePath = tuple[str, str, bool]

_checked: set[tuple[tuple[str, ...], tuple[StoragePath, ...]]] = set()  # per process


def alive_nodes() -> dict[str, dict[str, Any]]:
    """The alive nodes of the connected cluster: node id -> Ray's node record (``NodeID``,
    ``NodeManagerAddress``, ``Resources``...)."""
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]


def this_node() -> tuple[str, str]:
    """(node id, IP) of the Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id(), get_node_ip_address()  # type: ignore[no-untyped-call]


def describe_node(node_id: str, ip: str) -> str:
    """How messages name a node: its IP and id."""
    return f"{ip} (node {node_id})"


# ---- actors -------------------------------------------------------------------------------------
def actor_demand(
    num_cpus: float, num_gpus: float, resources: Mapping[str, float]
) -> dict[str, float]:
    """What one actor holds, as Ray names resources (zero amounts left out)."""
    demand = {"CPU": num_cpus, "GPU": num_gpus, **resources}
    return {name: float(amount) for name, amount in demand.items() if amount > 0}


def actor_demands(rc: RayConfig) -> dict[str, dict[str, float]]:
    """What one train actor and one predict actor hold."""
    return {
        "train": actor_demand(rc.train_num_cpus, rc.train_num_gpus, rc.train_resources),
        "predict": actor_demand(rc.predict_num_cpus, rc.predict_num_gpus, rc.predict_resources),
    }


def fits(resources: Mapping[str, Any], need: Mapping[str, float]) -> bool:
    """Whether a node of total ``resources`` can hold an actor that needs ``need``."""
    return all(float(resources.get(k, 0.0)) >= v - 1e-9 for k, v in need.items())


def predict_strategies(rc: RayConfig, n: int) -> tuple[list[dict[str, Any]], Any]:
    """The extra actor options of each of ``n`` predict actors, and the placement group they
    use (None: none; the caller removes it when the actors go).

    ``spread`` gives each actor Ray's ``SPREAD`` strategy (over the nodes, and an actor Ray
    restarts after its node is lost goes wherever there is room); ``pack`` reserves one bundle
    per actor in a ``PACK`` placement group (as few nodes as possible; Ray reschedules the
    bundles of a lost node); ``default`` leaves it to Ray. One node: always Ray's default.
    """
    if rc.predict_scheduling == "default" or len(alive_nodes()) < 2:
        return [{} for _ in range(n)], None
    if rc.predict_scheduling == "spread":
        return [{"scheduling_strategy": "SPREAD"} for _ in range(n)], None
    bundle = actor_demand(rc.predict_num_cpus, rc.predict_num_gpus, rc.predict_resources)
    if not bundle:  # nothing to reserve: a placement group needs a resource in each bundle
        return [{} for _ in range(n)], None
    group = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    in_group = [
        PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i in range(n)
    ]
    return [{"scheduling_strategy": s} for s in in_group], group


def remove_group(group: Any) -> None:
    """Release a placement group of ``predict_strategies`` (None: nothing to do)."""
    if group is not None:
        remove_placement_group(group)


def check_feasible(rc: RayConfig) -> None:
    """Fail early when no alive node can hold the train actor or a predict actor (a custom
    resource no node declares, more GPUs than any node has): Ray would wait forever.

    Raises:
        RuntimeError: naming the actor, what it needs and what the nodes have.
    """
    nodes = alive_nodes()
    have = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in nodes.values()]
    for role, need in actor_demands(rc).items():
        if any(fits(res, need) for res in have):
            continue
        missing = sorted({k for k, v in need.items() if all(res.get(k, 0.0) < v for res in have)})
        raise RuntimeError(
            f"no Ray node can hold a {role} actor: it needs {need} (ray.{role}_num_cpus, "
            f"ray.{role}_num_gpus, ray.{role}_resources) and no single node has "
            f"{', '.join(missing) or 'all of it'}; declare custom resources with "
            "`ray start --resources='{\"NAME\": AMOUNT}'` or change those settings (an "
            "autoscaling cluster that adds such nodes on demand: ray.check_nodes: false)"
        )


def driver_node_strategy() -> NodeAffinitySchedulingStrategy:
    """Pins a task to the driver's node: the grid's coordinators (they hold no CPU) then live
    where the driver lives, so losing a worker node takes only actors, which Ray restarts."""
    return NodeAffinitySchedulingStrategy(node_id=this_node()[0], soft=False)


# ---- shared storage ---------------------------------------------------------------------------
def storage_paths(cfg: ExperimentConfig) -> list[StoragePath]:
    """What every node must see: ``runs_root`` (written by the actors) and the data, model
    and auto-label inputs that exist here (a path missing here is the input check's business)."""
    candidates: list[tuple[str, Path | None, bool]] = [("runs_root", cfg.runs_root, True)]
    for split in ("pool", "val", "test"):
        src = getattr(cfg.data, split)
        if src is not None:
            candidates += [(f"data.{split}.source", src.source, False)]
            candidates += [(f"data.{split}.images", src.images, False)]
    candidates += [("model.weights", cfg.model.weights, False)]
    candidates += [("autolabel.model", cfg.autolabel.model, False)]
    return [
        (key, os.path.abspath(path), writable)
        for key, path, writable in candidates
        if path is not None and os.path.exists(path)
    ]


def probe_paths(paths: Sequence[StoragePath]) -> list[tuple[str, str, str]]:
    """What is wrong with ``paths`` in this process: (key, path, problem) for each path that
    does not exist, or that the workers write and cannot."""
    problems = []
    for key, path, writable in paths:
        if not os.path.exists(path):
            problems.append((key, path, "does not exist"))
        elif writable and not os.access(path, os.W_OK | os.X_OK):
            problems.append((key, path, "is not writable"))
    return problems


def check_shared_storage(
    paths: Sequence[StoragePath],
    demands: Sequence[Mapping[str, float]] = (),
    timeout: float = 120.0,
    *,
    force: bool = False,
) -> dict[str, str]:
    """On a cluster of several nodes, check that every alive node that can hold an actor of
    ``demands`` (none given: every alive node) sees ``paths``, with one ``num_cpus=0`` task
    pinned to each node (``NodeAffinitySchedulingStrategy``). Returns the nodes checked (node
    id -> IP); empty on one node, or when this process already checked the same nodes and
    paths (unless ``force``). A node that leaves the cluster during the check is skipped.

    Raises:
        DataError: every path some node does not see, each naming the node (IP and id).
        TimeoutError: a node did not answer within ``timeout`` seconds.
    """
    alive = alive_nodes()
    nodes = {
        nid: n
        for nid, n in alive.items()
        if not demands or any(fits(n.get("Resources", {}), need) for need in demands)
    }
    key = (tuple(sorted(nodes)), tuple(paths))
    if len(alive) < 2 or not nodes or not paths or (key in _checked and not force):
        return {}
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_paths)
    refs = {
        node_id: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote(list(paths))
        for node_id in nodes
    }
    _, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    ips = {nid: str(n.get("NodeManagerAddress", "?")) for nid, n in nodes.items()}
    if late:
        silent = [describe_node(nid, ips[nid]) for nid, ref in refs.items() if ref in late]
        raise TimeoutError(
            f"Ray node(s) {', '.join(silent)} did not answer the shared-storage check within "
            f"{timeout:g} s (ray.check_nodes: false skips the check)"
        )
    errors = []
    for node_id, ref in refs.items():
        try:
            found = ray.get(ref)
        except ray.exceptions.RayError as err:  # the node left the cluster meanwhile
            logger.warning("shared-storage check: node %s did not run it: %s", node_id, err)
            continue
        errors += [_storage_error(k, p, why, node_id, ips[node_id]) for k, p, why in found]
    if errors:
        raise DataError.many(errors)
    _checked.add(key)
    logger.info("shared storage: %d node(s) see %d path(s)", len(nodes), len(paths))
    return ips


def check_cluster(cfg: ExperimentConfig) -> None:
    """What a loop checks when it creates its actors (unless ``ray.check_nodes`` is false):
    they fit on some node, and (several nodes) the nodes that can hold them see its paths."""
    if cfg.ray.check_nodes:
        check_feasible(cfg.ray)
        check_shared_storage(storage_paths(cfg), list(actor_demands(cfg.ray).values()))


def _storage_error(key: str, path: str, why: str, node_id: str, ip: str) -> DataError:
    return DataError(
        path,
        None,
        None,
        f"{key} {why} on Ray node {describe_node(node_id, ip)}, though it does on the driver's; "
        "every node of the cluster must see runs_root and the data at the same path (shared "
        "storage, e.g. an NFS mount); or keep the actors off that node with custom resources "
        "(ray.predict_resources, ray.train_resources)",
    )
