"""The pretrained digits backbone (issue 18): its data set, its weights, its verb, the demo's use.

One short pretraining run (a few steps) is shared by the weight tests; the verb runs twice more.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detloop.cli.main import main
from detloop.config import ModelConfig, load_config
from detloop.data import pretrain_digits as pdata
from detloop.data.digits import load_mnist
from detloop.learners import checkpoint as ckpt
from detloop.learners.model import build_model
from detloop.learners.pretrain import (
    META_FILE,
    WEIGHTS_FILE,
    PretrainResult,
    PretrainSettings,
    cached,
    pretrain_backbone,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = PretrainSettings(epochs=1, max_steps=3)


@pytest.fixture(scope="module")
def digits() -> pdata.PretrainDigits:
    return pdata.load_pretrain_digits(0)


@pytest.fixture(scope="module")
def mnist_codes() -> np.ndarray:
    """The 5,000 MNIST digits digits-det is made of, in UCI's 8×8 form."""
    mnist, _ = load_mnist()
    return np.stack([pdata.grid_code(m) for m in mnist])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    return pretrain_backbone(tmp_path_factory.mktemp("pre"), QUICK, progress=False)


# ---- the pretraining set --------------------------------------------------------------------
def test_same_seed_same_arrays(digits: pdata.PretrainDigits) -> None:
    again = pdata.load_pretrain_digits(0)
    for name in ("digits", "labels", "train", "heldout"):
        np.testing.assert_array_equal(getattr(digits, name), getattr(again, name))
    first, labels = pdata.views(digits, "train", 0, 3)
    np.testing.assert_array_equal(first, pdata.views(again, "train", 0, 3)[0])
    assert not np.array_equal(first, pdata.views(digits, "train", 0, 4)[0])  # new views per epoch
    assert first.shape == (len(digits.train), pdata.CANVAS, pdata.CANVAS, 3)
    assert first.dtype == np.uint8 and labels.tolist() == digits.labels[digits.train].tolist()
    other = pdata.split_heldout(digits.labels, seed=1)[1]
    assert not np.array_equal(other, digits.heldout)


def test_heldout_is_disjoint_and_stratified(digits: pdata.PretrainDigits) -> None:
    assert len(digits.digits) == 1797 and digits.digits.shape[1:] == (32, 32)
    assert not set(digits.train.tolist()) & set(digits.heldout.tolist())
    assert len(digits.train) + len(digits.heldout) == 1797
    shares = np.bincount(digits.labels[digits.heldout]) / np.bincount(digits.labels)
    assert np.allclose(shares, pdata.HELDOUT_FRACTION, atol=0.01)


def test_views_look_like_digits_det(digits: pdata.PretrainDigits) -> None:
    """Dark ink on a light background, and every digit drawn (some pixels far darker)."""
    images, _ = pdata.views(digits, "heldout", 0, None)
    grey = images.astype(np.float32).mean(axis=3).reshape(len(images), -1)
    background = np.median(grey, axis=1)
    assert np.all(background > 100)
    assert np.all(grey.min(axis=1) < background - 40)


def _leaks(
    grids: np.ndarray, mnist_codes: np.ndarray
) -> tuple[set[str], list[tuple[int, int, int]]]:
    """Exact and near (L1 <= 8 in 8×8 form) matches of upsampled UCI digits and MNIST digits.

    Exact: the hashes of the upsampled digits against those of MNIST digits brought to the
    same form (UCI's 8×8, then the same upsampling). Near: UCI's nearest distinct pair is 16
    apart, a UCI digit's nearest MNIST digit 23.
    """

    def hashes(codes: np.ndarray) -> set[str]:
        ups = (pdata.upsample(c.astype(np.uint8)) for c in codes)
        return {hashlib.sha1(u.tobytes()).hexdigest() for u in ups}

    exact = hashes(grids) & hashes(mnist_codes)
    return exact, pdata.near_duplicates(grids, mnist_codes, max_l1=8)


def test_no_pretraining_digit_is_a_digits_det_digit(
    digits: pdata.PretrainDigits, mnist_codes: np.ndarray
) -> None:
    grids, _ = pdata.load_uci_digits()
    # the pretraining set is made of these grids and nothing else
    np.testing.assert_array_equal(digits.digits, np.stack([pdata.upsample(g) for g in grids]))
    assert _leaks(grids, mnist_codes) == (set(), [])


def test_the_leak_check_finds_a_planted_mnist_digit(mnist_codes: np.ndarray) -> None:
    """The check can fail: an MNIST digit slipped into the UCI set, as is and slightly
    changed (three blocks off by one), is found."""
    grids, _ = pdata.load_uci_digits()
    planted = grids.copy()
    planted[10] = mnist_codes[123]
    nudged = mnist_codes[4567].copy()
    nudged[3, 3:6] += 1
    planted[20] = np.clip(nudged, 0, 16)
    exact, near = _leaks(planted, mnist_codes)
    assert len(exact) == 1
    assert {(i, j) for i, j, _ in near} >= {(10, 123), (20, 4567)}


# ---- the weights ----------------------------------------------------------------------------
def test_weights_set_every_backbone_tensor_and_nothing_else(pretrained: PretrainResult) -> None:
    state = torch.load(pretrained.weights, weights_only=True)
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(preset="tiny"), 10)
    torch.manual_seed(0)
    loaded = build_model(ModelConfig(preset="tiny"), 10)
    ckpt.load_weights(loaded, pretrained.weights, "backbone")
    before, after = fresh.state_dict(), loaded.state_dict()
    backbone = {k for k in after if k.startswith("backbone.")}
    assert set(state) == backbone  # every backbone tensor, and only those, is in the file
    for key in backbone:
        assert torch.equal(after[key], state[key]), key
        assert not torch.equal(after[key], before[key]), f"{key} unchanged by pretraining"
    others = [k for k in after if k not in backbone]
    assert any(k.startswith("fpn.") for k in others) and any(
        k.startswith("box_net.") for k in others
    )
    for key in others:  # BiFPN and heads keep their fresh initialisation
        assert torch.equal(after[key], before[key]), key


def test_metadata(pretrained: PretrainResult) -> None:
    meta = json.loads((pretrained.weights.parent / META_FILE).read_text())
    assert meta["source"] == pdata.SOURCE and meta["preset"] == "tiny" and meta["seed"] == 0
    assert meta["backbone"] == "mobilenetv3_small_100" and meta["weights_kind"] == "backbone"
    assert 0.0 <= meta["accuracy"] <= 1.0 and meta["seconds"] > 0 and meta["steps"] == 3
    assert meta["n_train"] + meta["n_heldout"] == 1797
    assert meta["sha256"] == hashlib.sha256(pretrained.weights.read_bytes()).hexdigest()
    assert meta["settings"] == QUICK.key()


def test_cache_checks_settings_and_file(pretrained: PretrainResult, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(pretrained.weights.parent, folder)
    assert cached(folder, QUICK) is not None
    assert cached(folder, PretrainSettings(epochs=1, max_steps=4)) is None
    assert cached(folder, PretrainSettings(epochs=1, max_steps=3, seed=1)) is None
    (folder / WEIGHTS_FILE).write_bytes(b"truncated")
    assert cached(folder, QUICK) is None


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        PretrainSettings(preset="huge")
    with pytest.raises(ValueError, match="epochs"):
        PretrainSettings(epochs=0)


# ---- the verb -------------------------------------------------------------------------------
def test_verb_writes_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre"
    argv = ["pretrain", "digits", "--out", str(out), "--epochs", "1", "--max-steps", "2"]
    assert main([*argv, "--threads", "1"]) == 0
    assert (out / WEIGHTS_FILE).is_file() and (out / META_FILE).is_file()
    assert "wrote" in capsys.readouterr().out
    stamp = (out / WEIGHTS_FILE).stat().st_mtime_ns
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert (out / WEIGHTS_FILE).stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "extra",
    [["--epochs", "0"], ["--seed", "-1"], ["--max-steps", "0"], ["--threads", "0"]],
)
def test_verb_bad_arguments_exit_2(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "digits", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_verb_refuses_a_file_as_out_and_unknown_presets(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("")
    assert main(["pretrain", "digits", "--out", str(file)]) == 2
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "digits", "--out", str(tmp_path / "x"), "--preset", "huge"])
    assert info.value.code == 2


# ---- starting from it -----------------------------------------------------------------------
def test_demo_config_starts_from_the_pretrained_backbone() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.weights == REPO / "data" / "pretrained-digits-tiny" / WEIGHTS_FILE
    assert cfg.model.weights_kind == "backbone"
    scratch = load_config(REPO / "configs" / "demo.yaml", ["model.weights=null"])
    assert scratch.model.weights is None


def test_demo_builds_the_backbone_its_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detloop import demo

    calls: list[tuple[Path, str]] = []

    def fake(folder: Path, settings: PretrainSettings, **_: object) -> PretrainResult:
        calls.append((folder, settings.preset))
        return PretrainResult(folder / WEIGHTS_FILE, {"accuracy": 0.9, "seconds": 1.0}, False)

    monkeypatch.setattr("detloop.learners.pretrain.pretrain_backbone", fake)
    folder = tmp_path / "pre"
    config = REPO / "configs" / "demo.yaml"
    cfg = load_config(config, [f"model.weights={folder / WEIGHTS_FILE}"])
    demo.ensure_pretrained([cfg, cfg], folder)
    assert calls == [(folder, "tiny")]  # once for the two strategies' configs
    calls.clear()
    demo.ensure_pretrained([load_config(config, ["model.weights=null"])], folder)
    demo.ensure_pretrained([load_config(config, [f"model.weights={tmp_path / 'own.pt'}"])], folder)
    assert calls == []  # from scratch, or the user's own weights: nothing to build


def test_missing_weights_file_is_a_clear_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    overrides = [f"runs_root={runs}", f"model.weights={tmp_path / 'nope.pt'}"]
    argv = ["run", str(REPO / "configs" / "ci.yaml")]
    assert main([*argv, *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "model.weights" in err and "nope.pt" in err and "detloop pretrain digits" in err
    assert not runs.exists()  # refused before a run directory (or Ray) was made


def test_demo_stops_on_a_missing_weights_file(
    digits_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detloop import demo

    argv = ["--data", str(digits_tiny), "--size", "tiny", "--pretrained", str(tmp_path / "pre")]
    assert demo.main([*argv, "--set", f"model.weights={tmp_path / 'nope.pt'}"]) == 2
    out = capsys.readouterr().out
    assert "demo: error" in out and "nope.pt" in out
    assert not (tmp_path / "pre").exists()
