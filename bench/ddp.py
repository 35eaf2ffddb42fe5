"""Data-parallel training through Ray Train: 1 vs N CPU workers at the same global batch.

Usage: python bench/ddp.py [--data DIR] [--images 128] [--steps 64] [--batch 8] [--workers 2]
                           [--cpus-per-worker 1] [--set key=value ...]

Trains the tiny preset on the first --images pool images of digits-det small (built into
--data when absent) for --steps steps, through ``train_data_parallel`` with 1 worker and then
with --workers workers (same global batch, same seed, one Ray instance; both side by side in
this run). Prints steps/s of the training loop (rank 0's step seconds) and of the whole fit
(worker start-up included), their ratio, and the loss at equal numbers of samples (the
training history per epoch). Writes bench/results/ddp.json.

On a machine with fewer physical cores than workers × threads, expect no speed-up: the
figure to read there is the loss, which must agree within noise.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from benchkit import local_env, write_result
from detloop.config import load_config
from detloop.data.digits import digits_source, make_digits
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


def _train(cfg: Any, images: Any, labels: Any, out: Path) -> dict[str, Any]:
    from detloop.orchestrator.engine.ray_train import train_data_parallel
    from detloop.orchestrator.engine.workers import TrainJob

    t0 = time.perf_counter()
    outcome = train_data_parallel(cfg, TrainJob(images, labels, 10, str(out), seed=0))
    wall = time.perf_counter() - t0
    loop_seconds = float(outcome.history[-1]["seconds"])
    return {
        "workers": cfg.train.workers,
        "steps": outcome.steps,
        "loop_seconds": round(loop_seconds, 2),
        "fit_seconds": round(wall, 2),
        "steps_per_s": round(outcome.steps / loop_seconds, 3),
        "steps_per_s_with_startup": round(outcome.steps / wall, 3),
        "loss_by_step": {int(h["step"]): round(float(h["loss"]), 4) for h in outcome.history},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "detloop_digits_small"
    )
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    local_env()
    if not (args.data / "pool.json").exists():
        make_digits(args.data, "small", seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    run = RunDir(work / "run")
    source, images_dir = digits_source(args.data, "pool")
    import_source(run, "coco", source, "pool", images=images_dir)
    images = run.read_images().slice(0, args.images)
    labels = run.read_labels()
    labels = labels.filter(pc.is_in(labels["image_id"], images["image_id"]))

    import ray

    n = args.workers * args.cpus_per_worker
    ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False)
    sets = [
        "model.preset=tiny",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        "train.epochs=1000",
        f"ray.train_num_cpus={args.cpus_per_worker}",
        f"train.torch_threads={args.cpus_per_worker}",
        *args.overrides,
    ]
    rows = []
    for workers in (1, args.workers):
        cfg = load_config(REPO / "configs" / "ci.yaml", [*sets, f"train.workers={workers}"])
        rows.append(_train(cfg, images, labels, work / f"w{workers}"))
        print(f"{workers} worker(s): {rows[-1]}", flush=True)
    one, many = rows
    common = sorted(set(one["loss_by_step"]) & set(many["loss_by_step"]))
    result = {
        "what": "tiny preset, digits-det small, CPU; same global batch for 1 and N workers",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "images": images.num_rows,
        "global_batch": args.batch,
        "runs": rows,
        "speedup_loop": round(many["steps_per_s"] / one["steps_per_s"], 3),
        "speedup_with_startup": round(
            many["steps_per_s_with_startup"] / one["steps_per_s_with_startup"], 3
        ),
        "loss_at_equal_samples": {
            str(s * args.batch): [one["loss_by_step"][s], many["loss_by_step"][s]] for s in common
        },
    }
    print(f"speed-up of the training loop ({args.workers} vs 1 worker): {result['speedup_loop']}")
    print(f"speed-up with worker start-up: {result['speedup_with_startup']}")
    for samples, (a, b) in result["loss_at_equal_samples"].items():
        print(f"loss after {samples} samples: 1 worker {a:.4f}, {args.workers} workers {b:.4f}")
    print(f"wrote {write_result('ddp', result)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
