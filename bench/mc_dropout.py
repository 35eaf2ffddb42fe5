"""Cost of MC dropout: whole prediction (forward, decoding, MC statistics, NMS) relative to one
deterministic prediction of the same batch.

Usage: python bench/mc_dropout.py [--presets d0,tiny] [--samples 10] [--reps 3] [--threads 2]

Three ways per preset, same weights and batch (d0: 512×512, tiny: 128×128, batch 4):
  deterministic — one pass, no dropout (T = 1);
  head-only MC  — backbone + BiFPN once, heads on the T-times repeated features (the default);
  naive         — T complete forward passes with dropout, then the same decoding and NMS.
Each time is the minimum over rounds that run the variants in turn (robust on a shared CPU).
Two score regimes: ``init`` (fresh class prior 0.01: every anchor passes score_thresh 0.001, the
worst case for decoding and NMS) and ``sparse`` (class prior 1e-4, closer to a trained model).
Writes bench/results/mc_dropout.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from benchkit import interleaved_times
from detloop.config import ExperimentConfig
from detloop.learners.model import build_model, flatten_levels, split_box_maps
from detloop.learners.predict import Predictor

RESULTS = Path(__file__).parent / "results"
SIZES = {"d0": 512, "tiny": 128}


def predictors(preset: str, samples: int, prior: float) -> tuple[Predictor, Predictor]:
    """(MC predictor, deterministic predictor) sharing one set of weights."""
    size = SIZES[preset]
    mc_cfg = ExperimentConfig.model_validate(
        {
            "model": {"preset": preset, "image_size": size, "mc_dropoutsamp": samples},
            "train": {"device": "cpu"},
        }
    )
    torch.manual_seed(0)
    model = build_model(mc_cfg.model, num_classes=10)
    conv = (
        model.class_net.predict.conv_pw
        if hasattr(model.class_net.predict, "conv_pw")
        else model.class_net.predict.conv
    )
    with torch.no_grad():
        conv.bias.fill_(-math.log((1 - prior) / prior))
    det_cfg = mc_cfg.model_copy(deep=True)
    det_cfg.model.uncertainty = "lossatt"
    det_model = build_model(det_cfg.model, num_classes=10)
    det_model.load_state_dict(model.state_dict())
    return Predictor(model, mc_cfg, "cpu"), Predictor(det_model, det_cfg, "cpu")


def whole(p: Predictor, x: torch.Tensor, ids: list[str]) -> int:
    out = p.forward(x, ids, seed=0)
    return sum(len(p.postprocess(out, b, 1.0, (1e4, 1e4), 0)["score"]) for b in range(x.shape[0]))


@torch.no_grad()
def naive(p: Predictor, x: torch.Tensor, samples: int) -> int:
    """T complete passes with dropout, then the same reduction, decoding and NMS."""
    gen = torch.Generator().manual_seed(0)
    cls, mu, var = [], [], []
    for _ in range(samples):
        cls_maps, box_maps = p.model(x, generator=gen)
        cls.append(flatten_levels(cls_maps, p.model.spec.num_classes))
        m, s = split_box_maps(p.model, box_maps)
        assert s is not None
        mu.append(m)
        var.append(s)
    out = {"cls": torch.stack(cls), "mu": torch.stack(mu), "s": torch.stack(var)}
    return sum(len(p.postprocess(out, b, 1.0, (1e4, 1e4), 0)["score"]) for b in range(x.shape[0]))


def interleaved(fns: dict[str, Callable[[], int]], reps: int) -> dict[str, float]:
    """Minimum time of each function over ``reps`` interleaved rounds, after a warm-up."""
    for fn in fns.values():
        fn()  # warm-up
    return {k: min(v) for k, v in interleaved_times(fns, reps).items()}


def bench(preset: str, samples: int, reps: int, prior: float) -> dict[str, float]:
    mc, det = predictors(preset, samples, prior)
    size = SIZES[preset]
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = [f"img{i}" for i in range(4)]
    with torch.no_grad():
        cls = flatten_levels(det.model(x)[0], 10)
    passing = float((torch.sigmoid(cls.max(-1).values) >= 0.001).float().mean())
    n_det = whole(det, x, ids)
    t = interleaved(
        {
            "det": lambda: whole(det, x, ids),
            "head": lambda: whole(mc, x, ids),
            "naive": lambda: naive(mc, x, samples),
            "features": lambda: len(mc.model.features(x)),
        },
        reps,
    )
    t_det, t_head, t_naive, feats_t = t["det"], t["head"], t["naive"], t["features"]
    row = {
        "preset": preset,
        "image_size": size,
        "batch": 4,
        "samples": samples,
        "class_prior": prior,
        "anchors_passing_score_thresh": passing,
        "detections": n_det,
        "deterministic_s": t_det,
        "head_mc_s": t_head,
        "naive_mc_s": t_naive,
        "backbone_bifpn_s": feats_t,
        "head_ratio": t_head / t_det,
        "naive_ratio": t_naive / t_det,
    }
    print(
        f"{preset:>5} prior {prior:g} ({passing:.1%} anchors pass): deterministic {t_det:.3f} s | "
        f"head-only MC x{row['head_ratio']:.2f} | naive {samples} passes x{row['naive_ratio']:.2f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="d0,tiny")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "mc_dropout.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        bench(preset, args.samples, args.reps, prior)
        for preset in args.presets.split(",")
        for prior in (1e-2, 1e-4)
    ]
    summary = {
        "bench": "mc_dropout",
        "device": "cpu",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
        "target": "head-only MC on d0 <= 1.5x one deterministic prediction",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
