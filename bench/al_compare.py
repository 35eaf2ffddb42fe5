"""`random` vs `entropy` vs `alluncert` on digits-det small with class imbalance (r = 0.7).

Seeds x strategies loops of the demo config (the warm-up shared per seed), run one after the
other on one local Ray instance; reports the area under the AL curve (mAP vs labeled share,
normalised by the share covered) as mean ± std per strategy, and the wall time.

    python bench/al_compare.py [--seeds 0,1,2] [--iterations 4] [--set train.max_steps=300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchkit import REPO, local_env, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="random,entropy,alluncert")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    local_env()
    from detloop.config import load_config
    from detloop.data.digits import make_digits
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute
    from detloop.reports.al_curves import curve_auc, run_curve, write_report

    data = REPO / "data" / "digits-small-imb07"
    if not (data / "test.json").exists():
        make_digits(data, "small", seed=0, imbalance=0.7)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    t0 = time.perf_counter()
    runs = []
    for seed in (int(s) for s in split(args.seeds)):
        for strategy in split(args.strategies):
            sets = [
                "name=al_compare",
                f"runs_root={args.runs_root}",
                f"seed={seed}",
                f"al.strategy={strategy}",
                f"al.iterations={args.iterations}",
                *(f"data.{s}.source={data / (s + '.json')}" for s in ("pool", "val", "test")),
                *(f"data.{s}.images={data / 'images' / s}" for s in ("pool", "val", "test")),
                *args.overrides,
            ]
            cfg = load_config(REPO / "configs" / "demo.yaml", sets)
            run = create_run(cfg)
            print(f"== {strategy} seed {seed}: {run.path}", flush=True)
            if execute(run, stored_config(run)).exit_code != 0:
                raise SystemExit(f"loop failed: {run.path}")
            runs.append((strategy, seed, run))
    wall = time.perf_counter() - t0
    table: dict[str, list[float]] = {}
    curves: dict[str, list[list[float]]] = {}
    for strategy, _seed, run in runs:
        pts = run_curve(run)
        x = np.array([p.labeled_fraction for p in pts])
        y = np.array([p.map for p in pts])
        table.setdefault(strategy, []).append(curve_auc(x, y))
        curves.setdefault(strategy, []).append(y.tolist())
    png, md = write_report([r for _, _, r in runs], args.runs_root / "al_compare")
    out = {
        "dataset": "digits-det small, imbalance r=0.7",
        "iterations": args.iterations,
        "seeds": split(args.seeds),
        "overrides": args.overrides,
        "auc_map": {
            s: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
            for s, v in table.items()
        },
        "map_curves": curves,
        "wall_s": wall,
        "plot": png.name,  # beside the runs of the experiment, no machine path
    }
    print(md.read_text())
    for s, v in out["auc_map"].items():  # type: ignore[union-attr]
        print(f"{s:>10}: AUC(mAP) {v['mean']:.4f} ± {v['std']:.4f}")
    print(f"wall time {wall:.0f} s")
    write_result("al_compare", out)


if __name__ == "__main__":
    main()
