"""Orchestration overhead of the AL loop on the demo config.

overhead = iteration wall time (first phase start to last phase end) minus the compute measured
inside the workers and functions (training, prediction makespan, calibration, evaluation).
Target: <= 3 % of iteration time. Iteration 0 includes starting the actors (a one-off cost per
loop), so the figure is reported for iterations >= 1, for all iterations (the data import
counted as overhead), and for the whole run from the creation of its run.json, which adds the
start-up before the first phase (MLflow, and the part of Ray's start that overlaps it).

    python bench/loop_overhead.py [--run RUN_DIR]     # measure an existing run, or
    python bench/loop_overhead.py --iterations 3      # run the demo config fresh first
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchkit import REPO, local_env, write_result


def measure(run_dir: Path) -> dict[str, object]:
    from detloop.data.rundir import RunDir
    from detloop.orchestrator.engine.journal import Journal

    journal = Journal(RunDir(run_dir))
    iters = sorted({h["iteration"] for h in journal.history if h["phase"] == "log"})
    rows = {it: journal.iteration_overhead(it) for it in iters}
    for it, r in rows.items():
        r["overhead_pct"] = 100 * r["overhead"] / r["wall"] if r["wall"] else 0.0
        print(
            f"iteration {it}: wall {r['wall']:7.1f} s  compute {r['compute']:7.1f} s  "
            f"overhead {r['overhead']:6.2f} s ({r['overhead_pct']:.2f} %)"
        )

    def pct(its: list[int]) -> float:
        wall = sum(rows[i]["wall"] for i in its)
        return 100 * sum(rows[i]["overhead"] for i in its) / wall if wall else 0.0

    later = [i for i in iters if i >= 1]
    # the whole run: from run.json's creation (before MLflow and Ray start) to the last phase
    created = float(journal.meta.get("created", journal.history[0]["started"]))
    first = min(float(h["started"]) for h in journal.history)
    last = max(float(h["ended"]) for h in journal.history if h.get("ended"))
    setup = first - created
    run_wall = last - created
    run_over = setup + sum(r["overhead"] for r in rows.values())
    out = {
        "run": "/".join(Path(run_dir).parts[-2:]),  # experiment/run, no machine path
        "iterations": {str(k): v for k, v in rows.items()},
        "overhead_pct_iterations_ge_1": pct(later),
        "overhead_pct_all": pct(iters),
        "setup_before_first_phase_s": setup,
        "run_wall_s": run_wall,
        "overhead_pct_run": 100 * run_over / run_wall if run_wall else 0.0,
        "target_pct": 3.0,
    }
    print(f"overhead, iterations >= 1: {out['overhead_pct_iterations_ge_1']:.2f} % (target <= 3 %)")
    print(f"overhead, all iterations (actor start-up included): {out['overhead_pct_all']:.2f} %")
    print(
        f"overhead, whole run from its creation ({setup:.1f} s of MLflow/Ray start-up before "
        f"the first phase included): {out['overhead_pct_run']:.2f} %"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, help="measure this run directory")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--strategy", default="entropy")
    args = parser.parse_args()
    local_env()
    run_dir = args.run
    if run_dir is None:
        from detloop.cli.main import main as cli
        from detloop.config import load_config
        from detloop.demo import ensure_dataset
        from detloop.orchestrator.engine.runs import run_dir_for

        data = REPO / "data" / "digits-small"
        ensure_dataset(data, "small", seed=0)
        root = Path(tempfile.mkdtemp(prefix="overhead-"))
        sets = [
            f"runs_root={root}",
            f"al.iterations={args.iterations}",
            f"al.strategy={args.strategy}",
            "tracking.enabled=true",
        ]
        t0 = time.perf_counter()
        code = cli(
            ["run", str(REPO / "configs" / "demo.yaml"), *[a for s in sets for a in ("--set", s)]]
        )
        print(f"run finished with exit {code} in {time.perf_counter() - t0:.0f} s")
        cfg = load_config(REPO / "configs" / "demo.yaml", sets)
        run_dir = run_dir_for(cfg).path
    out = measure(run_dir)
    write_result("loop_overhead", out)


if __name__ == "__main__":
    main()
