"""GPU paths (issue 15, item 5): AMP + channels-last training, head-only MC prediction on CUDA
against the CPU, and fractional ``ray.predict_num_gpus`` packing two predict actors on one GPU.

Every test is marked ``gpu`` (``make test`` runs ``-m "not gpu"``) and skipped where
``torch.cuda.is_available()`` is False. On a CUDA machine: ``pytest -m gpu tests/test_gpu.py``.

One module-scoped training serves all three: the tiny preset on digits-det tiny, 6 epochs of 8
steps on CUDA with AMP and channels-last, interrupted after 2 epochs and resumed (the partial
checkpoint carries CUDA optimizer, scaler and generator state).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.digits import digits_source
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir
from detloop.learners.checkpoint import load_state_dict, read_metadata
from detloop.learners.model import UncertainEfficientDet
from detloop.learners.predict import Predictor
from detloop.learners.train import TrainResult, train_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
EPOCHS, BATCH = 6, 8  # 64 pool images: 8 steps per epoch, 48 steps in all
STOP_AT = 16  # the first call stops here (end of epoch 2); the second resumes from it
COORDS = ("x1", "y1", "x2", "y2")
MC_COLS = ("mc_x1", "mc_y1", "mc_x2", "mc_y2")


@dataclass(frozen=True)
class Trained:
    """The module's CUDA training: its result, config, run and what the spy saw."""

    result: TrainResult
    cfg: ExperimentConfig
    run: RunDir
    forwards: list[dict[str, Any]]
    warnings: list[str]

    def split(self, name: str) -> pa.Table:
        images = self.run.read_images()
        return images.filter(pc.equal(images["split"], name))


def _train_labels(run: RunDir, images: pa.Table) -> pa.Table:
    gt = run.read_gt()
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=images["image_id"].combine_chunks()))
    return gt.append_column("weight", pa.array(np.ones(gt.num_rows, np.float32)))


def _spy_features(seen: list[dict[str, Any]]) -> Callable[..., list[torch.Tensor]]:
    """``UncertainEfficientDet.features`` that also records how each training call ran."""
    original = UncertainEfficientDet.features

    def features(self: UncertainEfficientDet, x: torch.Tensor) -> list[torch.Tensor]:
        if self.training:
            seen.append(
                {
                    "device": x.device.type,
                    "autocast": torch.is_autocast_enabled("cuda"),
                    "channels_last": x.is_contiguous(memory_format=torch.channels_last),
                }
            )
        return original(self, x)

    return features


class _Records(logging.Handler):
    """The warnings the training logs (a step with a non-finite loss is skipped with one; the
    epoch losses of the history are NaN-means, so they would not show it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("gpu")
    run = RunDir(root / "run")
    for split in ("pool", "val"):
        source, images = digits_source(digits_tiny, split)
        import_source(run, "coco", source, split, images=images)
    all_images = run.read_images()
    pool = all_images.filter(pc.equal(all_images["split"], "pool"))
    labels = _train_labels(run, pool)
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"preset": "tiny", "channels_last": True},
            "train": {"device": DEVICE, "amp": True, "epochs": EPOCHS, "batch_size": BATCH},
        }
    )
    seen: list[dict[str, Any]] = []
    out = root / "ckpt"
    records = _Records()
    train_log = logging.getLogger("detloop.learners.train")
    train_log.addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(UncertainEfficientDet, "features", _spy_features(seen))
            part = train_model(
                cfg, pool, labels, 10, out, seed=0, progress=False, stop_at_step=STOP_AT
            )
            assert part.steps == STOP_AT and part.checkpoint.name == "ckpt.partial"
            assert len(seen) == STOP_AT
            result = train_model(cfg, pool, labels, 10, out, seed=0, progress=False)
    finally:
        train_log.removeHandler(records)
    return Trained(result, cfg, run, seen, records.messages)


def test_amp_channels_last_training_on_cuda(trained: Trained) -> None:
    result, seen = trained.result, trained.forwards
    assert all(s == {"device": DEVICE, "autocast": True, "channels_last": True} for s in seen), (
        seen[:3]
    )
    # 16 steps, then resumed from the partial checkpoint: 32 more, not 48
    assert len(seen) == EPOCHS * 64 // BATCH
    assert result.steps == EPOCHS * 64 // BATCH and len(result.history) == EPOCHS
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses), losses
    assert not [m for m in trained.warnings if "non-finite loss" in m], trained.warnings
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    meta = read_metadata(result.checkpoint)
    assert meta["steps"] == result.steps and meta["num_classes"] == 10
    state = load_state_dict(result.checkpoint)
    assert all(v.device.type == "cpu" for v in state.values())
    # AMP keeps fp32 master weights: nothing half-precision is saved
    assert all(v.dtype != torch.float16 for v in state.values() if v.is_floating_point())
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    val = trained.split("val").slice(0, 4)
    for device in (DEVICE, "cpu"):
        table = Predictor.from_checkpoint(result.checkpoint, trained.cfg, device).predict(
            val, seed=0
        )
        schema.validate_table(table, schema.PREDICTIONS)
        assert table.num_rows > 0


# ---- CPU vs CUDA predictions ---------------------------------------------------------------


def _rows_by_image(table: pa.Table) -> dict[str, np.ndarray]:
    ids = np.asarray(table.column("image_id").to_pylist())
    return {image_id: np.flatnonzero(ids == image_id) for image_id in np.unique(ids)}


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), -1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), -1)
    return np.asarray(inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9))


def match(
    ref: pa.Table, other: pa.Table, floor: float = 0.05, iou_min: float = 0.5
) -> tuple[np.ndarray, int]:
    """Pairs (row of ``ref``, row of ``other``): each ``ref`` detection scoring at least
    ``floor``, in score order, takes the unused ``other`` detection of its image and class
    with the highest IoU (at least ``iou_min``); and the number of such ``ref`` detections."""
    ref_box = np.stack([_col(ref, c) for c in COORDS], 1)
    other_box = np.stack([_col(other, c) for c in COORDS], 1)
    ref_score = _col(ref, "score")
    ref_cls, other_cls = _col(ref, "class_id"), _col(other, "class_id")
    other_rows = _rows_by_image(other)
    pairs: list[tuple[int, int]] = []
    n = 0
    for image_id, rows in _rows_by_image(ref).items():
        rows = rows[ref_score[rows] >= floor]
        n += len(rows)
        cand = other_rows.get(image_id, np.zeros(0, np.int64))
        if not len(rows) or not len(cand):
            continue
        iou = _iou(ref_box[rows], other_box[cand])
        iou *= ref_cls[rows][:, None] == other_cls[cand][None, :]
        used: set[int] = set()
        for k in np.argsort(-ref_score[rows], kind="stable"):
            free = [int(j) for j in np.argsort(-iou[k]) if int(j) not in used]
            if free and iou[k, free[0]] >= iou_min:
                used.add(free[0])
                pairs.append((int(rows[k]), int(cand[free[0]])))
    return np.array(pairs, np.int64).reshape(-1, 2), n


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p))


def deterministic_disagreement(cpu: pa.Table, gpu: pa.Table) -> dict[str, float]:
    """How far the CUDA table is from the CPU one: matched share of the CPU detections
    (score >= 0.05), and over matched pairs the |Δ logit(score)| and max-coordinate |Δ box|
    (original pixels) quantiles."""
    pairs, n = match(cpu, gpu)
    i, j = pairs[:, 0], pairs[:, 1]
    dlogit = np.abs(_logit(_col(cpu, "score")[i]) - _logit(_col(gpu, "score")[j]))
    dbox = np.max([np.abs(_col(cpu, c)[i] - _col(gpu, c)[j]) for c in COORDS], 0)
    return {
        "n": float(n),
        "matched": len(pairs) / max(n, 1),
        "logit_median": float(np.median(dlogit)),
        "logit_q95": float(np.quantile(dlogit, 0.95)),
        "box_median": float(np.median(dbox)),
        "box_q95": float(np.quantile(dbox, 0.95)),
    }


def mc_disagreement(a: pa.Table, b: pa.Table, samples: int) -> dict[str, float]:
    """How far two MC tables (T = ``samples`` each) are apart: matched share, median |log
    ratio| of the MC box stds and of ``mc_class``, median log ratio of the MC box stds (a
    bias), and the 95th percentile of |Δ MC mean box| in units of its standard error."""
    pairs, n = match(a, b)
    i, j = pairs[:, 0], pairs[:, 1]
    sa = np.stack([_col(a, c)[i] for c in MC_COLS], 1)
    sb = np.stack([_col(b, c)[j] for c in MC_COLS], 1)
    log_ratio = np.log(sb + 1e-3) - np.log(sa + 1e-3)
    cls_ratio = np.log(_col(b, "mc_class")[j] + 1e-6) - np.log(_col(a, "mc_class")[i] + 1e-6)
    dbox = np.stack([np.abs(_col(a, c)[i] - _col(b, c)[j]) for c in COORDS], 1)
    z = dbox / (np.hypot(sa, sb) / math.sqrt(samples) + 1e-3)
    return {
        "n": float(n),
        "matched": len(pairs) / max(n, 1),
        "mc": float(np.median(np.abs(log_ratio))),
        "mc_bias": float(np.median(log_ratio)),
        "mc_class": float(np.median(np.abs(cls_ratio))),
        "box_z95": float(np.quantile(z, 0.95)),
    }


def test_head_mc_prediction_on_cuda_matches_the_cpu(trained: Trained) -> None:
    """The same checkpoint predicted on CUDA and on the CPU (32 val images).

    Deterministic pass (T = 1): CUDA runs the network under fp16 autocast, the CPU in fp32, so
    the tables differ by fp16 rounding only. Running this network on the CPU under fp16
    autocast (the same op lists) gave: 98.8% of the detections scoring >= 0.05 matched
    (same class, IoU >= 0.5; the rest are NMS near-ties), |Δ logit(score)| median 0.003 and
    95th percentile 0.05, |Δ box| median 0.09 px and 95th percentile 1.6 px on 128 px images
    (the l-norm decoding adds half the fp16-rounded variance to log-sizes). The bounds
    below are 2.5-10 times those; a real fault (wrong memory format, swapped coordinates,
    unscaled boxes, a lost head) moves boxes by tens of pixels.

    MC (T = 10, head-only): masks come from a generator on the predictor's device with the
    same seed, and CUDA's Philox stream differs from the CPU's Mersenne Twister, so the CUDA
    MC columns are another draw of the same estimator. The CPU table of a second seed is the
    yardstick: CUDA vs CPU may disagree at most 1.5 times as much as the two CPU seeds do,
    plus the fp16 share (0.003 in |log ratio|, 0.4 in box z on the CPU under fp16 autocast).
    """
    val = trained.split("val")
    ckpt = trained.result.checkpoint
    det_cfg = trained.cfg.model_copy(
        update={"model": trained.cfg.model.model_copy(update={"mc_dropoutsamp": 1})}
    )
    cpu = Predictor.from_checkpoint(ckpt, det_cfg, "cpu").predict(val, seed=0)
    gpu = Predictor.from_checkpoint(ckpt, det_cfg, DEVICE).predict(val, seed=0)
    assert gpu.column("mc_x1").null_count == gpu.num_rows  # T = 1: no MC estimate
    d = deterministic_disagreement(cpu, gpu)
    assert d["n"] >= 50, d  # enough confident detections for the comparison to mean anything
    assert d["matched"] >= 0.95, d
    assert d["logit_median"] <= 0.05 and d["logit_q95"] <= 0.25, d
    assert d["box_median"] <= 0.5 and d["box_q95"] <= 4.0, d

    samples = trained.cfg.model.mc_dropoutsamp
    assert samples == 10 and trained.cfg.model.mc_mode == "head"
    cpu_p = Predictor.from_checkpoint(ckpt, trained.cfg, "cpu")
    mc_gpu = Predictor.from_checkpoint(ckpt, trained.cfg, DEVICE).predict(val, seed=0)
    mc_cpu, mc_cpu_other = (cpu_p.predict(val, seed=s) for s in (0, 1))
    for table in (mc_gpu, mc_cpu):
        schema.validate_table(table, schema.PREDICTIONS)
        assert table.column("mc_x1").null_count == 0 and table.column("mc_class").null_count == 0
        assert (_col(table, "mc_x1") > 0).mean() > 0.9
    ref = mc_disagreement(mc_cpu, mc_cpu_other, samples)
    got = mc_disagreement(mc_cpu, mc_gpu, samples)
    assert got["matched"] >= ref["matched"] - 0.1, (got, ref)
    assert got["mc"] <= 1.5 * ref["mc"] + 0.1, (got, ref)
    assert got["mc_class"] <= 1.5 * ref["mc_class"] + 0.1, (got, ref)
    assert abs(got["mc_bias"]) <= math.log(1.5), (got, ref)
    assert got["box_z95"] <= 1.5 * ref["box_z95"] + 0.5, (got, ref)


# ---- fractional GPUs -----------------------------------------------------------------------


@pytest.fixture
def ray_one_gpu() -> Iterator[None]:
    """A fresh local Ray instance declaring exactly one GPU (whatever ran before)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_fractional_gpus_pack_two_predict_actors_on_one_gpu(
    trained: Trained, ray_one_gpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from detloop.orchestrator.engine import actors as actors_module
    from detloop.orchestrator.engine.actors import Workers
    from detloop.orchestrator.engine.workers import PredictJob, PredictWorker, ShardResult

    class ProbedPredictWorker(PredictWorker):  # local: Ray sends it by value
        def probe(self) -> dict[str, Any]:
            """What this actor holds and where its model ran."""
            import ray as ray_in_actor
            import torch as torch_in_actor

            predictor = self._shards.predictor
            return {
                "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray_in_actor.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": None if predictor is None else predictor.device.type,
                "allocated": torch_in_actor.cuda.memory_allocated(),
            }

    monkeypatch.setattr(actors_module, "PredictWorker", ProbedPredictWorker)
    cfg = ExperimentConfig.model_validate(
        {
            "runs_root": str(tmp_path / "runs"),
            "ray": {"predict_workers": 2, "predict_num_gpus": 0.5, "predict_num_cpus": 1},
        }
    )
    assert cfg.train.device == "auto"  # the actors pick CUDA because Ray gave them a GPU share
    val = trained.split("val")
    shards = [(k, val.slice(8 * k, 8), k) for k in range(4)]
    weights = (trained.result.checkpoint / "model.pt").read_bytes()
    results: list[ShardResult] = []
    workers = Workers(cfg)
    try:
        workers.predict(PredictJob("gpu", weights, 10, shards), results.append)
        probes = ray.get([a.probe.remote() for a in workers.predictors], timeout=60)
        # both actors alive at once, each holding half of the one GPU: none left over
        total = ray.cluster_resources()  # type: ignore[no-untyped-call]
        left = ray.available_resources()  # type: ignore[no-untyped-call]
        assert total.get("GPU") == 1.0 and left.get("GPU", 0.0) == 0.0
    finally:
        workers.shutdown()
    assert len({p["pid"] for p in probes}) == 2, probes
    assert all(p["gpu_ids"] == probes[0]["gpu_ids"] and len(p["gpu_ids"]) == 1 for p in probes)
    assert all(p["device"] == DEVICE and p["allocated"] > 0 for p in probes), probes
    assert sorted(r.shard for r in results) == [0, 1, 2, 3]
    table = pa.concat_tables([r.table for r in results])
    schema.validate_table(table, schema.PREDICTIONS)
    assert set(table.column("image_id").to_pylist()) <= set(val.column("image_id").to_pylist())
    assert table.num_rows > 0 and table.column("mc_x1").null_count == 0


@pytest.mark.ray
def test_a_worker_given_no_gpu_stays_on_the_cpu(ray_one_gpu: None) -> None:
    """Ray leaves the host's GPUs visible to a worker that reserved none; with
    ``train.device: auto`` such a worker must not take one."""
    import ray

    from detloop.orchestrator.engine.workers import within_ray_resources

    cfg = ExperimentConfig.model_validate({})

    @ray.remote(num_cpus=1, num_gpus=0)
    def device_without() -> str:
        return within_ray_resources(cfg).train.device

    @ray.remote(num_cpus=1, num_gpus=0.5)
    def device_with() -> str:
        return within_ray_resources(cfg).train.device

    assert ray.get(device_without.remote()) == "cpu"
    assert ray.get(device_with.remote()) == "auto"
