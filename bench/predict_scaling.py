"""Predicting the pool with 2 PredictWorkers (1 CPU, 1 torch thread each) vs 1 such worker.

Builds digits-det small (once), trains the tiny model briefly (so scores are realistic), then
predicts the whole pool through the loop's own actor pool with 1 and with 2 workers, after a
warm-up shard on each. Target: speed-up >= 1.7x on the 2-core CI machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchkit import REPO, local_env, quick_model, write_result


def main() -> None:
    local_env()
    import ray

    from detloop.config import load_config
    from detloop.orchestrator.engine.actors import Workers
    from detloop.orchestrator.engine.workers import PredictJob
    from detloop.orchestrator.loops.steps import shard_tables

    tmp = Path(tempfile.mkdtemp(prefix="predscale-"))
    weights, n_cls, images = quick_model(REPO / "configs" / "demo.yaml", tmp, steps=100)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"runs_root={tmp}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    shards = [(i, t, i) for i, t in enumerate(shard_tables(images, cfg.ray.shard_size))]
    out: dict[str, object] = {"images": images.num_rows, "shard_size": cfg.ray.shard_size}
    for n in (1, 2):
        c = load_config(
            REPO / "configs" / "demo.yaml",
            [f"runs_root={tmp}", f"ray.predict_workers={n}", "ray.predict_num_cpus=1"],
        )
        workers = Workers(c)
        warm = [(i, images.slice(i * 4, 4), 0) for i in range(n)]
        workers.predict(
            PredictJob("w", weights, n_cls, warm), lambda r: None
        )  # actors started, model built
        t0 = time.perf_counter()
        workers.predict(PredictJob("w", weights, n_cls, shards), lambda r: None)
        wall = time.perf_counter() - t0
        workers.shutdown()
        out[f"workers_{n}_s"] = wall
        out[f"workers_{n}_images_per_s"] = images.num_rows / wall
        print(
            f"{n} predict worker(s): {wall:.1f} s for {images.num_rows} images "
            f"({images.num_rows / wall:.1f} images/s)"
        )
    out["speedup"] = out["workers_1_s"] / out["workers_2_s"]  # type: ignore[operator]
    out["target_speedup"] = 1.7
    print(f"speed-up 2 vs 1 workers: {out['speedup']:.2f}x (target >= 1.7x)")
    write_result("predict_scaling", out)


if __name__ == "__main__":
    main()
