"""The warm-up cache: iteration 0 (random selection, model M0, its evaluation) is shared by
every strategy of one experiment and seed (ALGORITHMS §9.1) — and the SSL teacher (its labeled
split, model and evaluation) by every selection strategy of one seed.

The cache lives in ``<runs_root>/<name>/_warmup/<key>/``; the key hashes everything iteration 0
depends on (pool, seed, the loop's own ``ident`` — first AL budget, or the SSL split —, model
and training config). The first loop to arrive
takes a file lock and computes iteration 0, storing each output as it is produced and a
``complete`` marker last; loops that arrive meanwhile wait on the lock, then copy (letting go of
the lock at once, so any number of them copy side by side).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.collage import is_generated
from detloop.data.rundir import RunDir, RunsRoot

logger = logging.getLogger(__name__)

_EVAL_FILES = ("metrics.json", "val_predictions.parquet")


def _gt_digest(gt: pa.Table) -> bytes:
    """The ground truth's content (image, class, box of every row, in a fixed order): two
    pools with the same images but other boxes (e.g. corrected labels) get other keys."""
    cols = ["image_id", "class_id", *schema.COORDS]
    rows = gt.select(cols).sort_by([(c, "ascending") for c in cols])
    h = hashlib.sha256("\n".join(rows["image_id"].to_pylist()).encode())
    for name in cols[1:]:
        h.update(np.asarray(rows[name].to_numpy(), dtype=np.float64).tobytes())
    return h.digest()


def warmup_key(run: RunDir, cfg: ExperimentConfig, ident: dict[str, Any]) -> str:
    """Hash of what iteration 0 depends on (``ident``: what the loop's selection of it reads)."""
    # generated images (RCC collages, added after the split) are outputs of iteration 0, not
    # inputs: left out, so the key is the same before and after they are written
    images = run.read_images()
    images = images.filter(pc.invert(is_generated(images["image_id"])))
    gt = run.read_gt()
    pool = sorted(
        i
        for i, split, state in zip(
            images["image_id"].to_pylist(),
            images["split"].to_pylist(),
            images["state"].to_pylist(),
            strict=True,
        )
        if split == "pool" and state != "pruned"
    )
    h = hashlib.sha256()
    h.update("\n".join(pool).encode())
    ident = {
        **ident,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "predict": cfg.predict.model_dump(mode="json"),
    }
    h.update(json.dumps(ident, sort_keys=True).encode())
    h.update(_gt_digest(gt.filter(pc.invert(is_generated(gt["image_id"])))))
    return h.hexdigest()[:16]


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or directory so that ``dst`` appears whole or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    staged = tmp / dst.name
    if src.is_dir():
        shutil.copytree(src, staged)
    else:
        shutil.copy2(src, staged)
    if dst.is_dir():
        shutil.rmtree(dst)
    os.replace(staged, dst)
    shutil.rmtree(tmp, ignore_errors=True)


class WarmupCache:
    """Per-run handle on the shared warm-up cache (disabled when ``path`` is None)."""

    def __init__(
        self, path: Path | None, run: RunDir, cfg: ExperimentConfig, ident: dict[str, Any]
    ) -> None:
        self.path = path
        self.run = run
        self.cfg = cfg
        self.ident = ident
        self._lock: IO[Any] | None = None

    @classmethod
    def for_run(cls, run: RunDir, cfg: ExperimentConfig, ident: dict[str, Any]) -> WarmupCache:
        if cfg.al.oracle == "human":  # iteration 0 depends on what people label
            return cls(None, run, cfg, ident)
        return cls(RunsRoot(cfg.runs_root).warmup(cfg.name, "pending"), run, cfg, ident)

    def _dir(self) -> Path | None:
        if self.path is None:
            return None
        if self.path.name == "pending":
            self.path = self.path.parent / warmup_key(self.run, self.cfg, self.ident)
        return self.path

    @property
    def complete(self) -> bool:
        d = self._dir()
        return d is not None and (d / "complete").exists()

    def _acquire(self) -> None:
        d = self._dir()
        if d is None or self._lock is not None:
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(d.parent / f"{d.name}.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _restore(self, name: str, dst: Path) -> bool:
        """Copy ``name`` from a complete cache (False: this loop computes iteration 0). The
        lock is only for waiting on the loop that computes: a complete cache never changes,
        so a loop that finds it complete lets go at once and never holds up the next one."""
        self._acquire()
        d = self._dir()
        if d is None or not self.complete:
            return False
        self.release()
        _copy_atomic(d / name, dst)
        logger.info("warm-up cache hit: %s", d / name)
        return True

    def _store(self, src: Path, name: str) -> None:
        d = self._dir()
        if d is None or self.complete:
            return
        _copy_atomic(src, d / name)

    def restore_selection(self, dst: Path) -> bool:
        return self._restore("selection.parquet", dst)

    def store_selection(self, src: Path) -> None:
        self._store(src, "selection.parquet")

    def restore_checkpoint(self, dst: Path) -> bool:
        return self._restore("checkpoint", dst)

    def store_checkpoint(self, src: Path) -> None:
        self._store(src, "checkpoint")

    def restore_evaluation(self, run: RunDir, iteration: int) -> bool:
        if not self._restore(_EVAL_FILES[0], run.metrics_file(iteration)):
            return False
        return self._restore(_EVAL_FILES[1], run.val_predictions_file(iteration))

    def store_evaluation(self, run: RunDir, iteration: int) -> None:
        d = self._dir()
        if d is None or self.complete:
            return
        self._store(run.metrics_file(iteration), _EVAL_FILES[0])
        self._store(run.val_predictions_file(iteration), _EVAL_FILES[1])
        (d / "complete").touch()
        self.release()
