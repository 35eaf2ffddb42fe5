"""Benchmark of uncertainty decoding (ALGORITHMS §2): closed form vs Monte-Carlo sampling.

Speed: ``l-norm`` (and ``n-flow``) against ``sample`` with 100 draws over 100,000 anchors
(float32, one CPU thread by default, best and median of several repeats after a warm-up).
Target: l-norm ≥ 20× faster.

Accuracy: every method's corner means and stds against a 10⁶-sample Monte Carlo of the same
generative model (``sample`` with n = 10⁶, chunked) on a subset of the anchors. Errors are
|std − std_ref|/std_ref and |mean − mean_ref|/size (size = predicted width or height).

    python bench/decode.py [--anchors 100000] [--ref-anchors 1000] [--device cpu]

Prints the figures and writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from detloop.learners.decode import decode_boxes

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"


def make_case(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random anchors in a 512×512 input (sides 16–256), offsets and variances v ∈ [0.001, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    side = 16 * 2 ** (4 * torch.rand(n, 1, generator=g))
    ratio = 2 ** (2 * torch.rand(n, 1, generator=g) - 1)
    wh = torch.cat([side * ratio.sqrt(), side / ratio.sqrt()], dim=1)
    xy = torch.rand(n, 2, generator=g) * 512
    anchors = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    t = torch.cat([torch.rand(n, 2, generator=g) - 0.5, 2 * torch.rand(n, 2, generator=g) - 1], 1)
    v = 0.001 + 0.499 * torch.rand(n, 4, generator=g)
    return t.to(device), v.to(device), anchors.to(device)


def timed(fn: Any, repeats: int, device: str) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def moment_errors(
    means: torch.Tensor, stds: torch.Tensor, ref_m: torch.Tensor, ref_s: torch.Tensor
) -> dict[str, float]:
    w = ref_m[:, 2] - ref_m[:, 0]
    h = ref_m[:, 3] - ref_m[:, 1]
    size = torch.stack([w, h, w, h], dim=1)
    std_err = ((stds - ref_s).abs() / ref_s).double()
    mean_err = ((means - ref_m).abs() / size).double()
    return {
        "std_rel_err_mean": float(std_err.mean()),
        "std_rel_err_max": float(std_err.max()),
        "mean_err_over_size_mean": float(mean_err.mean()),
        "mean_err_over_size_max": float(mean_err.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, default=100_000)
    parser.add_argument("--draws", type=int, default=100, help="draws of the `sample` method")
    parser.add_argument("--ref-anchors", type=int, default=1000)
    parser.add_argument("--ref-samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    dev = args.device
    torch.set_num_threads(args.threads)
    t, v, anchors = make_case(args.anchors, args.seed, dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    runs = {
        "l-norm": lambda: decode_boxes(t, v, anchors, "l-norm"),
        "n-flow": lambda: decode_boxes(t, v, anchors, "n-flow"),
        "falsedec": lambda: decode_boxes(t, v, anchors, "falsedec"),
        "sample": lambda: decode_boxes(t, v, anchors, "sample", args.draws, gen),
    }
    speed: dict[str, Any] = {}
    with torch.no_grad():
        for name, fn in runs.items():
            times = timed(fn, args.repeats if name != "sample" else max(3, args.repeats // 3), dev)
            speed[name] = {"min_s": min(times), "median_s": statistics.median(times)}
            print(
                f"{name:>9}: best {1e3 * min(times):9.2f} ms, median "
                f"{1e3 * statistics.median(times):9.2f} ms for {args.anchors} anchors"
            )
    # Best-of-N is the robust figure on a shared machine; the median is kept for reference.
    ratio = speed["sample"]["min_s"] / speed["l-norm"]["min_s"]
    ratio_median = speed["sample"]["median_s"] / speed["l-norm"]["median_s"]
    print(
        f"speed ratio sample({args.draws}) / l-norm: {ratio:.1f}x best-of-N, "
        f"{ratio_median:.1f}x median (target >= 20x)"
    )

    k = args.ref_anchors
    start = time.perf_counter()
    with torch.no_grad():
        ref_gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
        ref_m, ref_s = decode_boxes(t[:k], v[:k], anchors[:k], "sample", args.ref_samples, ref_gen)
        ref_s_time = time.perf_counter() - start
        accuracy = {}
        for name in ("l-norm", "n-flow", "sample", "falsedec"):
            m, s = decode_boxes(t[:k], v[:k], anchors[:k], name, args.draws, gen)
            accuracy[name] = moment_errors(m, s, ref_m, ref_s)
            a = accuracy[name]
            print(
                f"{name:>9} vs {args.ref_samples:.0e}-sample MC on {k} anchors: std rel. err "
                f"mean {a['std_rel_err_mean']:.2e} max {a['std_rel_err_max']:.2e}; mean err/size "
                f"mean {a['mean_err_over_size_mean']:.2e} max {a['mean_err_over_size_max']:.2e}"
            )
    # The reference itself is an estimate: its std error is ~ sqrt((kurtosis − 1)/(4n)).
    print(f"(reference noise floor ~{1 / math.sqrt(2 * args.ref_samples):.1e} and above)")
    result = {
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "anchors": args.anchors,
        "draws": args.draws,
        "speed": speed,
        "speed_ratio_sample_over_lnorm": ratio,
        "speed_ratio_median": ratio_median,
        "target_ratio": 20.0,
        "reference": {"anchors": k, "samples": args.ref_samples, "seconds": ref_s_time},
        "accuracy": accuracy,
        "seed": args.seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
