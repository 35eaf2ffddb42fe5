"""GPU figures (issue 15, item 5): EfficientDet-d0 at 512 px on one device.

Usage: python bench/gpu.py [--device cuda] [--batch 16] [--steps 40] [--loader-workers 4]
                           [--images 256] [--predict-batch 8] [--samples 10] [--reps 2]
                           [--actors 2] [--cpus-per-actor 2] [--shard-size 32]
                           [--max-nms-inputs 5000]
                           [--tiny] [--out PATH]

Three figures, each printed with the device that produced it:

1. Training images/s: ``learners.train.train_model`` on the d0 preset at 512×512 (the preset's
   own input is 1024×512), AMP (CUDA only) and channels-last, --batch images per step, one
   warm-up epoch of --steps steps, then one timed epoch of --steps steps. Two rates: the steps
   alone (the training loop's own step seconds) and the wall time of the epoch (data loading
   with --loader-workers DataLoader processes included).
2. Prediction images/s of ``Predictor.predict`` over --images images: head-only MC dropout
   with T = --samples (the default, backbone and BiFPN once) vs deterministic (T = 1), the
   same weights; wall time (image loading included) and the predictor's compute seconds.
3. 1 vs N predict actors: the loop's own Ray actor pool (``engine.actors.Workers``) predicting
   the same images in --shard-size shards with T = --samples, first 1 actor holding the whole
   GPU, then --actors actors holding 1/N of it each (fractional ``ray.predict_num_gpus``),
   after a warm-up shard per actor (start-up and model build not timed).

Images: digits-det tiny (built in a temporary folder; 128 px, letterboxed up to the input
size), repeated under new image ids to the counts needed; the weights are those trained for
figure 1. A d0 trained for a few dozen steps still scores nearly every one of its 49,104
anchors above score_thresh 0.001, so prediction decodes and NMS-es the --max-nms-inputs
highest-scoring anchors per image (``predict.max_nms_inputs``; 5000 by default, effdet's own
``max_detection_points``; 0: every anchor over the threshold, the worst case).

Writes bench/results/gpu.json for a CUDA run of d0; any other run (``--tiny``, or a device
other than CUDA) writes bench/results/gpu_smoke_<device>.json so that it is never taken for
the GPU figures.

GPU: on a machine with a CUDA device, from the repository root with the project's virtualenv:

    pytest -m gpu tests/test_gpu.py    # AMP + channels-last training, head-only MC on CUDA
                                       # vs the CPU, two predict actors packed on one GPU
    python bench/gpu.py                # d0 @ 512: the figures above, bench/results/gpu.json

``make test`` never runs them (``-m "not gpu"``); the tests skip themselves without CUDA. On
a CPU-only machine, ``python bench/gpu.py --device cpu --tiny`` runs the whole script in
under a minute (the tiny preset at 128 px, a few steps and images) to prove it works; its
figures are CPU figures and say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from benchkit import interleaved_times, local_env, write_result


def _device_label(device: str) -> str:
    """The device as printed next to every figure, e.g. ``cuda (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _tiled(images: pa.Table, labels: pa.Table, n: int) -> tuple[pa.Table, pa.Table]:
    """``n`` image rows: ``images`` repeated under new ids (``<id>#<copy>``), with their labels."""
    copies = math.ceil(n / images.num_rows)
    img_parts, lab_parts = [], []
    for k in range(copies):
        ids = pa.array([f"{i}#{k}" for i in images["image_id"].to_pylist()], pa.string())
        img_parts.append(
            images.set_column(images.schema.get_field_index("image_id"), "image_id", ids)
        )
        lab_ids = pa.array([f"{i}#{k}" for i in labels["image_id"].to_pylist()], pa.string())
        lab_parts.append(
            labels.set_column(labels.schema.get_field_index("image_id"), "image_id", lab_ids)
        )
    tiled = pa.concat_tables(img_parts).slice(0, n)
    tiled_labels = pa.concat_tables(lab_parts)
    keep = pc.is_in(tiled_labels["image_id"], value_set=tiled["image_id"].combine_chunks())
    return tiled, tiled_labels.filter(keep)


def _digits(work: Path) -> tuple[pa.Table, pa.Table]:
    """The pool images of digits-det tiny and their labels (weight 1), imported into a run."""
    from detloop.data.digits import digits_source, make_digits
    from detloop.data.importer import import_source
    from detloop.data.rundir import RunDir

    make_digits(work / "digits", "tiny", seed=0)
    run = RunDir(work / "run")
    source, images_dir = digits_source(work / "digits", "pool")
    import_source(run, "coco", source, "pool", images=images_dir)
    images = run.read_images()
    gt = run.read_gt()
    gt = gt.append_column("weight", pa.array([1.0] * gt.num_rows, pa.float32()))
    return images.select(["image_id", "file", "width", "height"]), gt


def _config(args: argparse.Namespace, work: Path, **sections: dict[str, Any]) -> Any:
    from detloop.config import ExperimentConfig

    model = {"preset": args.preset, "image_size": args.size, "channels_last": True}
    data: dict[str, Any] = {
        "runs_root": str(work / "runs"),
        "model": {**model, "mc_dropoutsamp": args.samples},
        "train": {"device": args.device, "amp": True},
        "predict": {"batch_size": args.predict_batch, "max_nms_inputs": args.max_nms_inputs},
    }
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    return ExperimentConfig.model_validate(data)


def bench_train(
    args: argparse.Namespace, work: Path, images: pa.Table, labels: pa.Table, label: str
) -> tuple[dict[str, Any], Path]:
    """Figure 1: a warm-up epoch, then a timed one; the checkpoint for the other figures."""
    import torch

    from detloop.learners.train import train_model

    n = args.batch * args.steps
    train_images, train_labels = _tiled(images, labels, n)
    cfg = _config(
        args,
        work,
        train={"batch_size": args.batch, "epochs": 2, "num_workers": args.loader_workers},
    )
    amp = cfg.train.amp and args.device.startswith("cuda")
    marks: list[float] = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_model(
        cfg,
        train_images,
        train_labels,
        10,
        work / "ckpt",
        seed=0,
        progress=False,
        on_epoch=lambda _epoch, _model: marks.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    hist = result.history
    step_s = hist[1]["seconds"] - hist[0]["seconds"]
    wall_s = marks[1] - marks[0]
    row: dict[str, Any] = {
        "preset": args.preset,
        "image_size": args.size,
        "batch": args.batch,
        "timed_steps": args.steps,
        "amp": amp,
        "channels_last": True,
        "loader_workers": args.loader_workers,
        "step_images_per_s": round(n / step_s, 2),
        "wall_images_per_s": round(n / wall_s, 2),
        "warmup_epoch_s": round(marks[0] - t0, 2),
        "whole_fit_s": round(total, 2),
        "loss_by_epoch": [round(float(h["loss"]), 4) for h in hist],
    }
    if args.device.startswith("cuda"):
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(
        f"[{label}] train {args.preset}@{args.size} batch {args.batch}, AMP "
        f"{'on' if amp else 'off'}, channels-last: {row['step_images_per_s']:.1f} images/s "
        f"(steps only), {row['wall_images_per_s']:.1f} images/s (epoch wall, "
        f"{args.loader_workers} loader workers)",
        flush=True,
    )
    return row, result.checkpoint


def bench_predict(
    args: argparse.Namespace, work: Path, model: Any, images: pa.Table, label: str
) -> dict[str, Any]:
    """Figure 2: T-sample head-only MC vs deterministic prediction, in this process."""
    import torch

    from detloop.learners.predict import Predictor

    mc_cfg = _config(args, work)
    det_cfg = _config(args, work, model={"mc_dropoutsamp": 1})
    predictors = {
        "mc": Predictor(model, mc_cfg, args.device),
        "det": Predictor(model, det_cfg, args.device),
    }
    assert predictors["mc"].mc_samples == args.samples and predictors["det"].mc_samples == 1
    assert model.spec.mc_mode == "head"
    warm = images.slice(0, args.predict_batch)
    rows: dict[str, int] = {}
    compute: dict[str, list[float]] = {k: [] for k in predictors}
    for p in predictors.values():
        p.predict(warm, seed=0)  # CUDA context, cuDNN plans, allocator

    def run(key: str) -> Callable[[], None]:
        def go() -> None:
            p = predictors[key]
            before = p.seconds
            rows[key] = p.predict(images, seed=0).num_rows
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            compute[key].append(p.seconds - before)

        return go

    times = interleaved_times({k: run(k) for k in predictors}, args.reps)
    out: dict[str, Any] = {
        "images": images.num_rows,
        "batch": args.predict_batch,
        "samples": args.samples,
        "max_nms_inputs": args.max_nms_inputs,
        "reps": args.reps,
    }
    for key in predictors:
        best = min(range(args.reps), key=times[key].__getitem__)  # the round of least load
        out[f"{key}_images_per_s"] = round(images.num_rows / times[key][best], 2)
        out[f"{key}_compute_images_per_s"] = round(images.num_rows / compute[key][best], 2)
        out[f"{key}_detections_per_image"] = round(rows[key] / images.num_rows, 1)
    out["mc_over_det_time"] = round(out["det_images_per_s"] / out["mc_images_per_s"], 3)
    print(
        f"[{label}] predict {args.preset}@{args.size} batch {args.predict_batch}, pre-NMS top "
        f"{args.max_nms_inputs or 'all'}, "
        f"{images.num_rows} images: deterministic {out['det_images_per_s']:.1f} images/s "
        f"({out['det_compute_images_per_s']:.1f} compute only) | head-only MC T={args.samples} "
        f"{out['mc_images_per_s']:.1f} images/s ({out['mc_compute_images_per_s']:.1f} compute "
        f"only): MC takes x{out['mc_over_det_time']:.2f} the time",
        flush=True,
    )
    return out


def bench_actors(
    args: argparse.Namespace, work: Path, weights: bytes, images: pa.Table, label: str
) -> dict[str, Any]:
    """Figure 3: the loop's predict actor pool, 1 actor vs --actors actors on one device."""
    import ray

    from detloop.orchestrator.engine.actors import Workers
    from detloop.orchestrator.engine.workers import PredictJob
    from detloop.orchestrator.loops.steps import shard_tables

    cuda = args.device.startswith("cuda")
    counts = [1, args.actors] if args.actors > 1 else [1]
    ray.init(
        address="local",
        num_cpus=max(counts) * args.cpus_per_actor,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    shards = [(i, t, i) for i, t in enumerate(shard_tables(images, args.shard_size))]
    out: dict[str, Any] = {
        "images": images.num_rows,
        "shard_size": args.shard_size,
        "samples": args.samples,
        "cpus_per_actor": args.cpus_per_actor,
    }
    try:
        for n in counts:
            gpus = 1.0 / n if cuda else 0.0
            cfg = _config(
                args,
                work,
                # an actor sees only the GPU Ray gave it, as its device 0
                train={"device": "cuda" if cuda else "cpu"},
                ray={
                    "predict_workers": n,
                    "predict_num_gpus": gpus,
                    "predict_num_cpus": args.cpus_per_actor,
                    "shard_size": args.shard_size,
                },
            )
            workers = Workers(cfg)
            try:
                warm = [(i, images.slice(i * 2, 2), 0) for i in range(n)]
                workers.predict(PredictJob("w", weights, 10, warm), lambda r: None)
                t0 = time.perf_counter()
                workers.predict(PredictJob("w", weights, 10, shards), lambda r: None)
                wall = time.perf_counter() - t0
                if cuda:  # every actor held its share of the one GPU while predicting
                    left = ray.available_resources()  # type: ignore[no-untyped-call]
                    out[f"actors_{n}_gpus_left"] = float(left.get("GPU", 0.0))
            finally:
                workers.shutdown()
            out[f"actors_{n}_num_gpus_each"] = gpus
            out[f"actors_{n}_images_per_s"] = round(images.num_rows / wall, 2)
            print(
                f"[{label}] {n} predict actor(s), num_gpus {gpus:g} each, T={args.samples}: "
                f"{images.num_rows / wall:.1f} images/s",
                flush=True,
            )
    finally:
        ray.shutdown()
    if len(counts) > 1:
        n = counts[1]
        out["speedup"] = round(out[f"actors_{n}_images_per_s"] / out["actors_1_images_per_s"], 3)
        print(f"[{label}] {n} vs 1 predict actors: x{out['speedup']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (cuda:N: not the actors)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny preset, a few steps")
    ap.add_argument("--batch", type=int, default=None, help="training batch (16; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (40; tiny 3)")
    ap.add_argument(
        "--loader-workers", type=int, default=None, help="DataLoader workers (4; tiny 0)"
    )
    ap.add_argument("--images", type=int, default=None, help="images predicted (256; tiny 16)")
    ap.add_argument("--predict-batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=10, help="MC samples T")
    ap.add_argument("--reps", type=int, default=None, help="prediction rounds (2; tiny 1)")
    ap.add_argument("--actors", type=int, default=2, help="N of the 1 vs N predict actors")
    ap.add_argument("--cpus-per-actor", type=int, default=None, help="(2; tiny 1)")
    ap.add_argument("--shard-size", type=int, default=None, help="(32; tiny 4)")
    ap.add_argument("--max-nms-inputs", type=int, default=5000, help="pre-NMS top-k; 0: all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tiny = args.tiny
    defaults = {
        "batch": (16, 4),
        "steps": (40, 3),
        "loader_workers": (4, 0),
        "images": (256, 16),
        "reps": (2, 1),
        "cpus_per_actor": (2, 1),
        "shard_size": (32, 4),
    }
    for key, (full, smoke) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if tiny else full)
    args.preset, args.size = ("tiny", 128) if tiny else ("d0", 512)
    local_env()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device here: run `python bench/gpu.py --device cpu --tiny` for the smoke "
            "mode, or this script on a machine with a GPU"
        )
    if not args.device.startswith("cuda"):
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    label = _device_label(args.device)
    gpu_run = args.device.startswith("cuda") and not tiny
    print(f"device: {label}{'' if gpu_run else ' -- smoke run, not GPU figures'}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    images, labels = _digits(work)
    train_row, ckpt = bench_train(args, work, images, labels, label)
    from detloop.learners.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt)
    weights = (ckpt / "model.pt").read_bytes()
    pred_images, _ = _tiled(images, labels, args.images)
    predict_row = bench_predict(args, work, model, pred_images, label)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the actors get the GPU memory this process held
    actors_row = bench_actors(args, work, weights, pred_images, label)

    result = {
        "device": label,
        "smoke": not gpu_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if args.device.startswith("cuda") else None,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "train": train_row,
        "predict": predict_row,
        "predict_actors": actors_row,
    }
    name = "gpu" if gpu_run else f"gpu_smoke_{args.device.split(':')[0]}"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        path = args.out
    else:
        path = write_result(name, result)
    print(f"[{label}] wrote {path.name}{'' if gpu_run else ' (smoke run: CPU or tiny figures)'}")


if __name__ == "__main__":
    main()
