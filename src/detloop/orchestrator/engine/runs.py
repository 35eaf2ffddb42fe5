"""Creating, finding and resuming loop runs; what ``detloop run|resume|grid`` share."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from detloop import __version__, console
from detloop.config import (
    ConfigError,
    ExperimentConfig,
    SSLConfig,
    build_config,
    config_snapshot,
)
from detloop.data.rundir import RunDir, RunsRoot, al_run_name, autolabel_run_name, ssl_run_name

logger = logging.getLogger(__name__)

SPLITS = ("pool", "val", "test")


def code_version() -> str:
    """Package version plus the git commit when the code runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}" if sha else __version__


def strategy_name(cfg: ExperimentConfig) -> str:
    """The canonical strategy of the config's loop, as run names and MLflow tags show it: the
    AL query strategy (``+ssl_<selection>`` with ``al.ssl``), or the SSL pseudo-label selection
    (``ema_<selection>`` with the online mean teacher, ``<teacher_strategy>+<selection>``
    with teacher building blocks, then ``ssl_study_marks``; ``<teacher_strategy>+teacher`` for
    ``ssl.teacher_only``), so that a grid's runs never share a directory."""
    if cfg.loop == "ssl":
        ema = "ema_" if cfg.ssl.teacher == "ema" else ""
        blocks = cfg.ssl.teacher_strategy.name
        name = ema + (f"{blocks}+" if blocks else "") + cfg.ssl.selection_strategy.name
        if cfg.ssl.method == "csd":  # no pseudo-label selection: the method names the run
            name = (f"{blocks}+" if blocks else "") + csd_name(cfg.ssl)
        if cfg.ssl.teacher_only:  # no student: a run of its own beside the students
            name = (f"{blocks}+" if blocks else "") + "teacher"
        return "".join([name, *(f"+{m}" for m in ssl_study_marks(cfg))])
    if cfg.loop == "autolabel":
        return "autolabel"
    ssl = f"+ssl_{cfg.ssl.selection_strategy.name}" if cfg.al.ssl else ""
    return cfg.al.strategy.name + ssl


def csd_name(ssl: SSLConfig) -> str:
    """An SSL run's name part under ``ssl.method: csd`` (§11.9): ``csd``, then a mark for each
    CSD option off its default (``_r<csd_ratio>``, ``_kl``, ``_nobe``, ``_bebatch``,
    ``_noramp``, ``_refsplit``), so that runs of different options never share a directory."""
    default_ratio = type(ssl).model_fields["csd_ratio"].default
    marks = [
        f"_r{ssl.csd_ratio}" if ssl.csd_ratio != default_ratio else "",
        "_kl" if ssl.csd_consistency == "kl" else "",
        "_nobe" if not ssl.csd_be else "_bebatch" if ssl.csd_be_scope == "batch" else "",
        "_noramp" if not ssl.csd_ramp else "",
        "_refsplit" if ssl.csd_split == "reference" else "",
    ]
    return "csd" + "".join(marks)


def ssl_study_marks(cfg: ExperimentConfig) -> list[str]:
    """What the pseudo-label threshold, PLS (§11.7) and the 3D study (§11.8) add to an SSL
    run's strategy name: ``tau<τ>`` when τ is not the default 0.4 (``p<target>`` instead with
    ``ssl.target_precision``, which replaces it), ``pls_<variant>`` (with
    ``_k``, ``_b``, ``_t`` and the value of ``pls_top_k``, ``pls_beta``, ``pls_tau`` when not
    the default), ``3d_<variant>``, ``ignore`` (``ssl.rejected``), ``L<k>``
    (``ssl.labeled_per_batch``), ``weakaug`` (``ssl.stac_randaug`` off), ``lam<λ>``,
    ``box<w>`` and ``mag<m>`` (``ssl.stac_lambda``, ``ssl.pseudo_box_weight`` and, with the
    strong augmentation on, ``ssl.randaug_magnitude`` off their defaults), ``pciou<v>``
    (``ssl.pcorrect_iou`` off 0.5 under ``pcorrect``) and ``from_teacher`` (a
    student that starts from the teacher, ``ssl.student_init``); none when they are off."""
    ssl = cfg.ssl
    fields = type(ssl).model_fields
    marks: list[str] = []
    selects = ssl.method == "stac" and not ssl.teacher_only
    if selects and ssl.target_precision is not None:  # replaces τ
        marks.append(f"p{ssl.target_precision:g}")
    elif selects and ssl.tau != fields["tau"].default:
        marks.append(f"tau{ssl.tau:g}")
    if ssl.pls != "none":
        options = (("k", "pls_top_k"), ("b", "pls_beta"), ("t", "pls_tau"))
        changed = [
            f"_{short}{getattr(ssl, key):g}"
            for short, key in options
            if getattr(ssl, key) != fields[key].default
        ]
        marks.append(f"pls_{ssl.pls}" + "".join(changed))
    if ssl.oracle_variant != "none":
        marks.append(f"3d_{ssl.oracle_variant}")
    if ssl.rejected == "ignore" and selects:
        marks.append("ignore")
    if ssl.labeled_per_batch is not None and selects:
        marks.append(f"L{ssl.labeled_per_batch}")
    if not ssl.stac_randaug and selects:
        marks.append("weakaug")
    tuned: tuple[tuple[str, str], ...] = (("lam", "stac_lambda"), ("box", "pseudo_box_weight"))
    if ssl.stac_randaug:
        tuned += (("mag", "randaug_magnitude"),)
    marks += [
        f"{short}{getattr(ssl, key):g}"
        for short, key in tuned
        if selects and getattr(ssl, key) != fields[key].default
    ]
    if selects and ssl.selection_strategy.needs_correctness:
        if ssl.pcorrect_iou != fields["pcorrect_iou"].default:
            iou = ssl.pcorrect_iou
            marks.append(f"pciou{iou}" if iou == "coco" else f"pciou{iou:g}")
    if ssl.student_init == "teacher" and not ssl.teacher_only:
        marks.append("from_teacher")
    return marks


def study_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """MLflow tags of an SSL run's PLS variant, 3D-study variant and student start (none for
    other loops)."""
    if cfg.loop != "ssl":
        return {}
    return {
        "pls": cfg.ssl.pls,
        "oracle_variant": cfg.ssl.oracle_variant,
        "student_init": cfg.ssl.student_init,
    }


def run_dir_for(cfg: ExperimentConfig, fresh: bool = False) -> RunDir:
    """``<runs_root>/<name>/<strategy>-s<seed>`` (AL) or ``ssl-<selection>-s<seed>`` (SSL),
    with ``strategy_name``'s marks; ``fresh`` picks an unused sibling."""
    if cfg.loop == "ssl":
        name = ssl_run_name(strategy_name(cfg), cfg.seed)
    elif cfg.loop == "autolabel":
        name = autolabel_run_name(cfg.seed)
    else:
        name = al_run_name(strategy_name(cfg), cfg.seed)
    root = RunsRoot(cfg.runs_root)
    return root.unused_run(cfg.name, name) if fresh else root.run(cfg.name, name)


def check_inputs(cfg: ExperimentConfig) -> None:
    """Check, before any work starts, the input a loop reads only when it trains: the file of
    ``model.weights`` (every iteration's training starts from it). A missing file would
    otherwise surface as a failed training phase, after the import.

    Raises:
        ConfigError: ``model.weights`` names no file.
    """
    if cfg.model.weights is None:
        return
    from detloop.learners.checkpoint import weights_file

    file = weights_file(Path(cfg.model.weights))
    if not file.is_file():
        msg = (
            f"{file}: no such weights file (nothing is downloaded). Build the digits backbone "
            "with `detloop pretrain digits --out DIR`, point model.weights at your own "
            "weights, or train from scratch with --set model.weights=null"
        )
        raise ConfigError("config", [("model.weights", msg)])


def create_run(cfg: ExperimentConfig, fresh: bool = False) -> RunDir:
    """The run directory of ``cfg``: created (with ``run.json``) or found for a resume.

    Raises:
        ConfigError: the config (the stored one, for a resume) names a missing weights file.
    """
    run = run_dir_for(cfg, fresh)
    if run.exists():
        meta = run.read_meta()
        if meta.get("config") != config_snapshot(cfg):
            logger.warning(
                "%s exists with another config; resuming with the stored one (use --fresh to "
                "start over)",
                run.path,
            )
        check_inputs(stored_config(run))
        return run
    check_inputs(cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_meta(
        {
            "kind": cfg.loop,
            "name": cfg.name,
            "run_name": run.name,
            "strategy": strategy_name(cfg),
            "seed": cfg.seed,
            "code_version": code_version(),
            "created": time.time(),
            "ray_job_id": ray_job_id(),
            "config": config_snapshot(cfg),
        }
    )
    return run


def stored_config(run: RunDir) -> ExperimentConfig:
    """The config snapshot of a run (paths in it are absolute)."""
    meta = run.read_meta()
    return build_config(meta["config"], source=str(run.run_json))


def import_data(run: RunDir, cfg: ExperimentConfig, hash_pool: bool = True) -> dict[str, Any]:
    """Import the config's data sources into the run, once (skipped when already imported).

    ``hash_pool``: perceptual hashes of the pool images, which only pruning reads.
    """
    from detloop.data.importer import import_source

    images = run.read_images()
    done = set(images["split"].to_pylist())
    out: dict[str, Any] = {}
    for split in SPLITS:
        src = getattr(cfg.data, split)
        if src is None or split in done:
            continue
        report = import_source(
            run,
            src.format,
            src.source,
            split,
            images=src.images,
            classes=cfg.data.classes,
            lenient=cfg.data.lenient,
            hash_pool=hash_pool,
            hash_method=cfg.al.hash_method,
        )
        console.say("%s | %s: %s", run.name, src.source, report.summary())
        out[split] = report.n_images
    return out


def ray_job_id() -> str | None:
    """The submission id when running as a ``ray job submit`` entrypoint, else None.

    The job supervisor hands the driver its job config (with the submission id in the
    metadata) through an environment variable.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    job = meta.get("job_submission_id")
    return str(job) if job else None
