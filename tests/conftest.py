"""Shared fixtures.

``digits_tiny`` (session scope): the root ``Path`` of a digits-det ``tiny`` dataset (seed 0,
64/32/32 images of 128×128 px), built once per test session in a temporary folder. It holds the
COCO files ``pool.json``, ``val.json``, ``test.json`` and the PNGs under ``images/<split>/``; the
``file_name`` values of a split's COCO file are relative to ``images/<split>``, so a config uses
``{format: coco, source: ROOT/pool.json, images: ROOT/images/pool}``
(``detloop.data.digits_source(root, split)`` returns that pair). Treat it as read-only: copy it
(``shutil.copytree``) before changing anything in it.

``digits_tiny_run`` (function scope): a fresh ``RunDir`` in ``tmp_path`` with the pool and val
splits of ``digits_tiny`` imported (categories "0".."9", gt of both splits, phash of the pool).

The environment variables that keep Ray and MLflow local and quiet are set for every test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detloop.data.digits import digits_source, make_digits
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir
from detloop.runtime_env import apply_local_env

apply_local_env()


@pytest.fixture(scope="session")
def digits_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a session-wide digits-det tiny dataset (read-only; see the module docstring)."""
    root = tmp_path_factory.mktemp("digits_tiny")
    make_digits(root, "tiny", seed=0)
    return root


@pytest.fixture
def digits_tiny_run(digits_tiny: Path, tmp_path: Path) -> RunDir:
    """A new run directory with digits_tiny's pool and val splits imported."""
    run = RunDir(tmp_path / "run")
    for split in ("pool", "val"):
        source, images = digits_source(digits_tiny, split)
        import_source(run, "coco", source, split, images=images)
    return run


@pytest.fixture(scope="module")
def local_ray() -> str:
    """A local Ray instance shared by the tests (4 logical CPUs: one AL loop holds a train
    actor and two predict actors); returns its GCS address for subprocess drivers.

    Module-scoped so that a test which ends every Ray process of the machine (`ray stop` in the
    `ray job submit` test) leaves a fresh instance, not a dead address, to the next module."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    return str(ray.get_runtime_context().gcs_address)


def ci_overrides(data_root: Path, runs_root: Path, *extra: str) -> list[str]:
    """``--set`` arguments pointing configs/ci.yaml at ``data_root`` and ``runs_root``."""
    values = [f"runs_root={runs_root}"]
    for split in ("pool", "val"):
        source, images = digits_source(data_root, split)
        values += [f"data.{split}.source={source}", f"data.{split}.images={images}"]
    return [arg for v in [*values, *extra] for arg in ("--set", v)]
