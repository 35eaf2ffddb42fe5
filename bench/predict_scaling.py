"""Predicting the pool with 2 PredictWorkers (1 CPU, 1 torch thread each) vs 1 such worker.

Builds digits-det small (once), trains the tiny model briefly (so scores are realistic), then
predicts the whole pool through the loop's own actor pool with 1 and with 2 workers, after a
warm-up shard on each. Target: speed-up >= 1.7x on the 2-core CI machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchkit import REPO, local_env, write_result


def main() -> None:
    local_env()
    import ray

    from detloop.config import load_config
    from detloop.data.importer import import_source
    from detloop.data.rundir import RunDir
    from detloop.demo import ensure_dataset
    from detloop.learners.train import train_model
    from detloop.orchestrator.engine.actors import Workers
    from detloop.orchestrator.engine.workers import PredictJob
    from detloop.orchestrator.loops.steps import shard_tables

    data = REPO / "data" / "digits-small"
    ensure_dataset(data, "small", seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="predscale-"))
    run = RunDir(tmp / "run")
    import_source(run, "coco", data / "pool.json", "pool", images=data / "images" / "pool")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"runs_root={tmp}", "train.max_steps=100"])
    images = run.read_images()
    labels = run.read_gt()
    n_cls = run.read_categories().num_rows
    import pyarrow as pa
    import pyarrow.compute as pc

    sub = images.slice(0, 200)
    lab = labels.filter(pc.is_in(labels["image_id"], value_set=sub["image_id"].combine_chunks()))
    lab = lab.append_column("source", pa.array(["gt"] * lab.num_rows))
    lab = lab.append_column("weight", pa.array([1.0] * lab.num_rows, pa.float32()))
    lab = lab.append_column("iteration", pa.array([0] * lab.num_rows, pa.int32()))
    res = train_model(cfg, sub, lab, n_cls, tmp / "ckpt", seed=0, progress=False)
    weights = (res.checkpoint / "model.pt").read_bytes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
