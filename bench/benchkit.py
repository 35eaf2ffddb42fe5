"""What every benchmark script shares: paths and the local-only Ray/MLflow environment."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detloop.runtime_env import apply_local_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def local_env() -> None:
    """Keep Ray on loopback without tokens or telemetry, and MLflow quiet."""
    apply_local_env()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Wall seconds of each function over ``reps`` rounds, run in turn within every round, so
    that load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def quick_model(config: Path, tmp: Path, steps: int, n_images: int = 200) -> tuple[bytes, int, Any]:
    """A model of ``config`` trained ``steps`` steps on the first ``n_images`` pool images of
    digits-det small (built under data/ when absent): (model.pt bytes, classes, the pool)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from detloop.config import load_config
    from detloop.data.importer import import_source
    from detloop.data.rundir import RunDir
    from detloop.demo import ensure_dataset
    from detloop.learners.train import train_model

    data = REPO / "data" / "digits-small"
    ensure_dataset(data, "small", seed=0)
    run = RunDir(tmp / "run")
    import_source(run, "coco", data / "pool.json", "pool", images=data / "images" / "pool")
    cfg = load_config(config, [f"runs_root={tmp}", f"train.max_steps={steps}"])
    images, labels = run.read_images(), run.read_gt()
    n_cls = run.read_categories().num_rows
    sub = images.slice(0, n_images)
    lab = labels.filter(pc.is_in(labels["image_id"], value_set=sub["image_id"].combine_chunks()))
    lab = lab.append_column("source", pa.array(["gt"] * lab.num_rows))
    lab = lab.append_column("weight", pa.array([1.0] * lab.num_rows, pa.float32()))
    lab = lab.append_column("iteration", pa.array([0] * lab.num_rows, pa.int32()))
    res = train_model(cfg, sub, lab, n_cls, tmp / "ckpt", seed=0, progress=False)
    return (res.checkpoint / "model.pt").read_bytes(), n_cls, images


def seed_stats(values: list[float]) -> dict[str, float]:
    """Mean, sample std and count over seeds of the finite values (NaN mean/std when none)."""
    import numpy as np

    arr = np.asarray([v for v in values if v == v], dtype=float)
    if not len(arr):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


#: an SSL round's figures (bench name: logged metric): test mAP and val mAP (the
#: pseudo-labels' count, precision and recall come from ``ssl_report.pseudo_figures``)
SSL_ROUND_KEYS = {"map": "test_map", "map50": "test_map50", "val_map": "map"}


def ssl_round_figures(run: Any) -> list[dict[str, float]]:
    """``SSL_ROUND_KEYS`` of every finished round of an SSL run, as the loop logged them, the
    pseudo-labels it trained on (``ssl_report.pseudo_figures``: an online teacher's own), the
    ``rank_*`` figures of its pseudo-label candidates' rankings and its test AP per class
    (``ap/<class>``)."""
    from detloop.reports.ssl_report import pseudo_figures, round_rows

    return [
        {
            **{k: float(row[v]) for k, v in SSL_ROUND_KEYS.items() if v in row},
            **pseudo_figures(row),
            # each selection signal's ranking of the candidates (selectors.pseudo_ranking)
            **{
                "rank_" + k.removeprefix(_RANK): float(v)
                for k, v in row.items()
                if k.startswith(_RANK)
            },
            # test AP per class
            **{k.removeprefix("test_"): float(v) for k, v in row.items() if k.startswith(_AP)},
        }
        for row in round_rows(run)
    ]


def ssl_pseudo_classes(run: Any) -> dict[str, list[dict[str, Any]]]:
    """Per round that made pseudo-labels, its per-class table (``pseudo_classes.json``)."""
    tables = {str(it): run.read_pseudo_classes(it) for it in run.iterations()}
    return {it: rows for it, rows in tables.items() if rows is not None}


_RANK = "pseudo_label_rank_"
_AP = "test_ap/"


def val_curves(run: Any, uri: str) -> dict[str, dict[str, list[list[float]]]]:
    """Every ``<round>_val_map`` and ``<round>_val_map50`` series the run logged to MLflow
    (``train.early_stopping`` evaluates val every ``map_freq`` epochs), as ``{"val_map":
    {round: [[epoch, value], ...]}, "val_map50": {...}}``: the training curves that say whether
    a model reached a plateau. A teacher restored from the cache logged none (its curve is in
    the run that trained it)."""
    from mlflow.tracking import MlflowClient

    out: dict[str, dict[str, list[list[float]]]] = {"val_map": {}, "val_map50": {}}
    run_id = run.read_meta().get("mlflow_run_id")
    if not run_id:
        return out
    client = MlflowClient(tracking_uri=uri)
    for name in sorted(client.get_run(run_id).data.metrics):
        stage, sep, metric = name.rpartition("_val_")
        if sep and f"val_{metric}" in out:
            history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
            out[f"val_{metric}"][stage] = [[float(m.step), float(m.value)] for m in history]
    return out


def digits_data(imbalance: float, balanced_test: bool = False) -> Path:
    """digits-det small with class imbalance r = ``imbalance`` under ``data/``, built once;
    with ``balanced_test`` its test split's classes uniform (pool and val the same)."""
    from detloop.data.digits import make_digits

    tail = "-bt" if balanced_test else ""
    data = REPO / "data" / f"digits-small-imb{round(imbalance * 10):02d}{tail}"
    if not (data / "test.json").exists():
        make_digits(data, "small", seed=0, imbalance=imbalance, balanced_test=balanced_test)
    return data


def data_sets(data: Path, pool: Path | None = None) -> list[str]:
    """``--set`` items pointing a config's pool/val/test at ``data`` (the pool's labels at
    ``pool`` when given)."""
    out = [f"data.pool.source={pool or data / 'pool.json'}"]
    out += [f"data.{s}.source={data / (s + '.json')}" for s in ("val", "test")]
    out += [f"data.{s}.images={data / 'images' / s}" for s in ("pool", "val", "test")]
    return out


def run_loop(cfg: Any, label: str) -> Any:
    """Create (or find, to resume) ``cfg``'s run, with the digits backbone it names built
    first, and execute its loop in this process; the run directory. A loop that does not end
    done raises."""
    from detloop.demo import ensure_pretrained
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute

    ensure_pretrained([cfg], REPO / "data" / "pretrained-digits-tiny")  # the config's backbone
    run = create_run(cfg)
    t0 = time.perf_counter()
    print(f"== {label}: {run.path.name}", flush=True)
    outcome = execute(run, stored_config(run))
    if outcome.exit_code != 0:
        raise RuntimeError(f"loop {run.name} ended {outcome.status}: {outcome.problem}")
    print(f"   {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run
