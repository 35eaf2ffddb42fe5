"""Pool prediction on two Ray nodes of one machine, and the driver's memory while merging.

1. Placement: 625 pool images of digits-det small predicted through the loop's own actor pool
   (``engine.actors.Workers``: 2 predict actors of 1 CPU and 1 torch thread each, shards of 64
   images) with the tiny model trained briefly (so detections are realistic), on a cluster of a
   head (3 logical CPUs, where the driver is) and a second node (2 logical CPUs). Two pools,
   both alive, predict in alternation (``ROUNDS`` times each, after a warm-up shard per actor;
   the best time counts, since other jobs share this machine): ``two_nodes``
   (``ray.predict_scheduling: spread``: one actor on each node, so weights, shards and results
   cross between the nodes' object stores) and ``one_node`` (both actors on the driver's node,
   pinned by a custom resource only the head declares, ``ray.predict_resources``). Target: two
   nodes >= 0.9 of the one-node images/s. Both nodes share this machine's 2 cores: this
   measures what spreading costs, not what a second machine would add.
2. Merge: a 100,000-image prediction merged by the loop's own code path
   (``loops.steps._merge_shards``: the shards held in memory, concatenated, sorted, validated)
   in a fresh process. The shards are the real prediction of part 1 (every column the
   predictor writes), repeated under new image ids. Peak memory is the process's peak resident
   set (``VmHWM``, reset with ``/proc/self/clear_refs`` just before the merge; ``ru_maxrss``
   where that is not available): tracemalloc would miss Arrow's buffers, which are most of it.

Prints the figures and writes bench/results/multinode.json.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import REPO, local_env, quick_model, write_result

ROUNDS = 4  # timed predictions of each pool, in alternation (other jobs share this machine)
POOL_IMAGES = 625  # x 160 = the 100,000 images of the merge
SHARD_SIZE = 64  # RayConfig's default ray.shard_size
MERGE_IMAGES = 100_000
CONFIG = REPO / "configs" / "demo.yaml"


def train_weights(tmp: Path) -> tuple[bytes, int, Any]:
    """The tiny model trained 60 steps on 200 pool images: (model.pt bytes, classes, pool)."""
    return quick_model(CONFIG, tmp, steps=60)


def start_pool(tmp: Path, overrides: list[str], weights: bytes, n_cls: int, images: Any) -> Any:
    """A loop's ``Workers`` with 2 predict actors of 1 CPU, their model built (a warm-up
    shard each)."""
    from detloop.config import load_config
    from detloop.orchestrator.engine.actors import Workers
    from detloop.orchestrator.engine.workers import PredictJob

    pool = ["ray.predict_workers=2", "ray.predict_num_cpus=1"]
    workers = Workers(load_config(CONFIG, [f"runs_root={tmp}", *pool, *overrides]))
    warm = [(i, images.slice(i * 4, 4), 0) for i in range(2)]
    workers.predict(PredictJob("w", weights, n_cls, warm), lambda r: None)
    return workers


def placement_figures(tmp: Path) -> tuple[dict[str, Any], Any]:
    """Part 1: the same pool prediction by the two-node pool and the one-node pool, in
    alternation; the figures and one prediction of the pool (for part 2)."""
    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    from detloop.orchestrator.engine.workers import PredictJob, ShardResult
    from detloop.orchestrator.loops.steps import shard_tables

    weights, n_cls, images = train_weights(tmp)
    images = images.slice(0, POOL_IMAGES)
    shards = [(i, t, i) for i, t in enumerate(shard_tables(images, SHARD_SIZE))]
    head = {"num_cpus": 3, "resources": {"driver_node": 2}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    tables: dict[int, Any] = {}

    def keep(result: ShardResult) -> None:
        tables[result.shard] = result.table

    try:
        # spread first (3 + 2 CPUs free: one actor on each node), then the pool pinned to the
        # driver's node by a custom resource only the head has
        pools = {
            "two_nodes": start_pool(tmp, ["ray.predict_scheduling=spread"], weights, n_cls, images),
            "one_node": start_pool(
                tmp, ["ray.predict_resources={driver_node: 1}"], weights, n_cls, images
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in pools}
        compute: dict[str, list[float]] = {name: [] for name in pools}
        for r in range(ROUNDS):
            for name in sorted(pools, reverse=r % 2 == 1):  # alternate which goes first
                t0 = time.perf_counter()
                makespan = pools[name].predict(PredictJob("w", weights, n_cls, shards), keep)
                times[name].append(time.perf_counter() - t0)
                compute[name].append(makespan)
        out: dict[str, Any] = {"images": images.num_rows, "shard_size": SHARD_SIZE}
        for name, workers in pools.items():
            nodes = sorted({node for node, _ in workers.placement})
            best = min(times[name])
            out[name] = {
                "seconds": times[name],
                "compute_makespan_s": compute[name],
                "best_s": best,
                "images_per_s": images.num_rows / best,
                "actors_per_node": [sum(n == node for n, _ in workers.placement) for node in nodes],
            }
            workers.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    out["ratio"] = out["two_nodes"]["images_per_s"] / out["one_node"]["images_per_s"]
    pairs = zip(times["one_node"], times["two_nodes"], strict=True)
    out["ratio_per_round"] = [one / two for one, two in pairs]
    out["target_ratio"] = 0.9
    return out, pa.concat_tables([tables[i] for i in sorted(tables)])


def _peak_rss_mb() -> float:
    """This process's peak resident set since the last reset, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def merge_child(template: str, pool_images: int, shard_size: int, out: Any) -> None:
    """Part 2 in a fresh process: the prediction ``template`` (a real one of a pool of
    ``pool_images`` images) repeated under new image ids up to ``MERGE_IMAGES`` pool images,
    cut into shards of ``shard_size`` images held as separate tables (as they arrive from the
    actors), then merged like the loop merges them."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from detloop.data.rundir import RunDir
    from detloop.orchestrator.loops.steps import _merge_shards

    base = pq.read_table(template).sort_by([("image_id", "ascending"), ("det_id", "ascending")])
    ids = base["image_id"].to_pylist()
    firsts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    cuts = [*firsts[::shard_size], base.num_rows]
    copies = -(-MERGE_IMAGES // pool_images)
    column = base.schema.get_field_index("image_id")
    arrived: dict[int, pa.Table] = {}
    for k in range(copies):
        renamed = pc.binary_join_element_wise(base["image_id"], f"~{k:03d}", "")
        copy = base.set_column(column, "image_id", renamed)
        for a, b in itertools.pairwise(cuts):
            arrived[len(arrived)] = copy.take(pa.array(range(a, b)))  # buffers of its own
    stats: dict[int, dict[str, int]] = {sid: {} for sid in arrived}
    held = sum(t.nbytes for t in arrived.values())
    before = _rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        reset = True
    except OSError:
        reset = False
    run = RunDir(Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    table, _ = _merge_shards(run, 1, "predict", len(arrived), arrived, stats)
    seconds = time.perf_counter() - t0
    out.put(
        {
            "pool_images": copies * pool_images,
            "images_with_detections": copies * len(firsts),
            "rows": table.num_rows,
            "columns": table.num_columns,
            "shards": len(arrived),
            "shard_size": shard_size,
            "shards_held_mb": held / 2**20,
            "merged_table_mb": table.nbytes / 2**20,
            "rss_before_merge_mb": before,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_is_merge_only": reset,
            "merge_s": seconds,
        }
    )


def merge_figures(tmp: Path, prediction: Any, pool_images: int, shard_size: int) -> dict[str, Any]:
    """Part 2: the merge child's figures."""
    import pyarrow.parquet as pq

    template = tmp / "prediction.parquet"
    pq.write_table(prediction, template)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=merge_child, args=(str(template), pool_images, shard_size, queue))
    child.start()
    result: dict[str, Any] = queue.get(timeout=600)
    child.join()
    result["peak_over_before_mb"] = result["peak_rss_mb"] - result["rss_before_merge_mb"]
    result["detections_per_image"] = result["rows"] / result["pool_images"]
    return result


def main() -> None:
    local_env()
    tmp = Path(tempfile.mkdtemp(prefix="multinode-"))
    out, prediction = placement_figures(tmp)
    out["merge"] = merge_figures(tmp, prediction, out["images"], SHARD_SIZE)
    out["cpu_count"] = os.cpu_count()
    for name in ("one_node", "two_nodes"):
        r = out[name]
        print(
            f"{name:9s}: best {r['best_s']:.1f} s of {[round(x, 1) for x in r['seconds']]} "
            f"({r['images_per_s']:.1f} images/s; compute makespans "
            f"{[round(x, 1) for x in r['compute_makespan_s']]} s), "
            f"predict actors per node {r['actors_per_node']}"
        )
    per_round = ", ".join(f"{x:.2f}" for x in out["ratio_per_round"])
    print(f"two nodes / one node: {out['ratio']:.2f} (target >= 0.9); per round: {per_round}")
    m = out["merge"]
    print(
        f"merge of {m['pool_images']:,} images ({m['rows']:,} detections, {m['columns']} "
        f"columns, {m['shards']} shards of {m['shard_size']}): {m['merge_s']:.1f} s; shards "
        f"held {m['shards_held_mb']:.0f} MiB, merged table {m['merged_table_mb']:.0f} MiB; "
        f"driver RSS {m['rss_before_merge_mb']:.0f} MiB before, peak {m['peak_rss_mb']:.0f} MiB "
        f"(+{m['peak_over_before_mb']:.0f} MiB)"
    )
    write_result("multinode", out)


if __name__ == "__main__":
    main()
