"""Experiment config: every problem at once with dotted paths, suggestions, overrides, paths."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from detloop.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    config_to_dict,
    flatten_config,
    load_config,
    parse_override,
)


def _problems(data: dict[str, object], overrides: list[str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        build_config(data, overrides)
    return dict(info.value.problems)


def test_defaults_are_valid_and_follow_the_reference() -> None:
    cfg = build_config({})
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.mc_dropoutsamp == 10 and cfg.model.clip_min_uncert == 0.01
    assert cfg.thresholding.thr_fpr_tpr == 0.95 and cfg.al.al_budgets == [5, 5, 5, 10, 20, 30, 25]
    assert cfg.runs_root.is_absolute()


def test_every_problem_is_reported_at_once_with_its_dotted_path() -> None:
    problems = _problems(
        {
            "train": {"epochs": 0, "batch_size": "many"},
            "model": {"mc_dropoutrate": 2, "preset": "d9"},
            "al": {"al_budgets": [60, 50]},
            "data": {"pool": {"format": "voc"}},
        }
    )
    assert {
        "train.epochs",
        "train.batch_size",
        "model.mc_dropoutrate",
        "model.preset",
        "al.al_budgets",
        "data.pool.format",
        "data.pool.source",
    } <= set(problems)
    assert "more than the whole pool" in problems["al.al_budgets"]
    assert "greater than or equal to 1" in problems["train.epochs"]


def test_unknown_keys_get_suggestions() -> None:
    problems = _problems(
        {"sed": 1, "train": {"epoch": 3}, "data": {"pool": {"source": "p.json", "imagez": "img"}}}
    )
    assert problems["sed"] == "unknown key (did you mean seed?)"
    assert problems["train.epoch"] == "unknown key (did you mean epochs?)"
    assert problems["data.pool.imagez"] == "unknown key (did you mean images?)"
    assert problems["train.epoch"] and len(problems) == 3


def test_semantic_checks() -> None:
    problems = _problems(
        {
            "model": {"clip_min_uncert": 5.0, "clip_max_uncert": 1.0},
            "train": {"scale_jitter": [2.0, 1.0]},
        }
    )
    assert set(problems) == {"model.clip_min_uncert", "train.scale_jitter"}
    assert "plain directory name" in _problems({"name": "a/b"})["name"]


def test_strategy_names_are_validated() -> None:
    problems = _problems({"al": {"strategy": "bogus_albox"}})
    assert "bogus" in problems["al.strategy"]
    assert build_config({"al": {"strategy": "perc_calib_norm_albox"}}).al.strategy


def test_threshold_uncertainties_are_validated() -> None:
    problems = _problems({"thresholding": {"thr_sel_uncert": "ENTALBOXSCOR"}})
    assert "position 8" in problems["thresholding.thr_sel_uncert"]
    cfg = build_config({"thresholding": {"thr_sel_uncert": "ENTALBOXSCORE"}})
    assert cfg.thresholding.thr_sel_uncert == "ENTALBOXSCORE"


def test_overrides_are_parsed_as_yaml_and_validated() -> None:
    assert parse_override("train.epochs=5") == ("train.epochs", 5)
    assert parse_override("al.al_budgets=[10, 20]") == ("al.al_budgets", [10, 20])
    assert parse_override("ray.address=null") == ("ray.address", None)
    assert parse_override("name= spaced") == ("name", "spaced")
    cfg = build_config(
        {"train": {"epochs": 9}},
        [
            "train.epochs=5",
            "data.lenient=true",
            "model.preset=d0",
            "data.pool.source=p.json",
            "al.al_budgets=[10, 20]",
        ],
    )
    assert cfg.train.epochs == 5 and cfg.data.lenient and cfg.model.preset == "d0"
    assert cfg.data.pool is not None and cfg.data.pool.source.name == "p.json"
    assert cfg.al.al_budgets == [10, 20]
    problems = _problems({"seed": 1}, ["train.epochs", "seed.x=1", "train.epochs=-1"])
    assert "expected KEY=VALUE" in problems["train.epochs"] and "seed.x" in problems
    assert "greater than or equal to 1" in _problems({}, ["train.epochs=-1"])["train.epochs"]
    assert "did you mean epochs" in _problems({}, ["train.epoch=2"])["train.epoch"]


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    path = cfg_dir / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "exp",
                "runs_root": "../runs",
                "data": {
                    "pool": {"source": "../data/pool.json", "images": "../data/images/pool"},
                    "val": {"source": "/abs/val.json"},
                },
            }
        )
    )
    monkeypatch.chdir(tmp_path / "configs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path, ["model.weights=w/backbone.pt"])
    assert cfg.runs_root == tmp_path / "runs"
    assert cfg.data.pool is not None and cfg.data.pool.source == tmp_path / "data" / "pool.json"
    assert cfg.data.pool.images == tmp_path / "data" / "images" / "pool"
    assert cfg.data.val is not None and cfg.data.val.source == Path("/abs/val.json")
    assert cfg.model.weights == cfg_dir / "w" / "backbone.pt"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("train:\n  epochs: 0\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "2 configuration problem(s)" in str(info.value)


def test_snapshot_round_trip(tmp_path: Path) -> None:
    cfg = build_config(
        {"name": "x", "data": {"pool": {"source": "p.json"}}},
        ["train.scale_jitter=[0.5, 1.5]"],
        base_dir=tmp_path,
    )
    snapshot = json.loads(json.dumps(config_to_dict(cfg)))
    again = build_config(snapshot)
    assert again == cfg
    flat = flatten_config(cfg)
    assert flat["train.epochs"] == "200" and flat["data.val"] == "null"
    assert flat["data.pool.source"] == str(tmp_path / "p.json")


def test_field_errors_and_a_bad_strategy_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"epochs": 0}, "al": {"strategy": "entorpy"}})
    paths = [p for p, _ in err.value.problems]
    assert "train.epochs" in paths
    assert "al.strategy" in paths
    assert "entropy" in str(err.value)  # the close match is suggested


def test_removed_keys_and_options_are_refused_by_name() -> None:
    """Keys nothing read were removed (an old config naming one gets an error naming it), and
    ``hebo`` (no such dependency) is refused when the config is loaded, not at run time."""
    problems = _problems(
        {
            "thresholding": {"match_mode": "coco", "optimizer": "hebo"},
            "predict": {"max_nms_inputs": -1},
            "train": {"moving_average_decay": 1.0},
        }
    )
    assert problems["thresholding.match_mode"].startswith("unknown key")
    assert "'optuna'" in problems["thresholding.optimizer"]
    assert "greater than or equal to 0" in problems["predict.max_nms_inputs"]
    assert "less than 1" in problems["train.moving_average_decay"]
    cfg = build_config({"al": {"hash_method": "w"}, "predict": {"max_nms_inputs": 1000}})
    assert cfg.al.hash_method == "w" and cfg.predict.max_nms_inputs == 1000


#: Sections whose keys wait for a reader (documented in their docstrings): none.
RESERVED: set[str] = set()


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        nested = [a for a in (info.annotation, *get_args(info.annotation)) if _is_section(a)]
        if nested:
            out += _leaf_keys(nested[0], f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def test_every_config_key_has_a_reader() -> None:
    """Each leaf key is read somewhere in ``src/`` (an attribute access ``.key``) outside the
    config module, except the reserved sections: a key that nothing reads is a promise the code
    does not keep (it was accepted and silently ignored)."""
    src = Path(__file__).resolve().parents[1] / "src" / "detloop"
    code = "\n".join(p.read_text() for p in sorted(src.rglob("*.py")) if p.name != "config.py")
    unread = [
        key
        for key in _leaf_keys(ExperimentConfig)
        if key.split(".")[0] not in RESERVED
        and not re.search(rf"\.{key.rsplit('.', 1)[-1]}\b", code)
    ]
    assert unread == []
