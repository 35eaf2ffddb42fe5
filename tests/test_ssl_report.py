"""The SSL run summary a person reads at the end of ``detloop run`` / ``detloop status``."""

from __future__ import annotations

import json
from pathlib import Path

from detloop.data.rundir import RunDir
from detloop.reports.ssl_report import ssl_summary


def _round(run: RunDir, iteration: int, metrics: dict[str, float]) -> None:
    run.iteration_dir(iteration).mkdir(parents=True)
    run.metrics_file(iteration).write_text(json.dumps(metrics))


def test_summary_shows_each_round_and_an_online_teachers_own_labels(tmp_path: Path) -> None:
    """One line per round; an online mean teacher's round shows the precision and recall of
    the labels its student trained on (``train_online_*``), not the burn-in teacher's offline
    pick that its pseudo_label phase scored."""
    run = RunDir(tmp_path / "ssl-ema_score-s0")
    run.path.mkdir()
    run.run_json.write_text(json.dumps({"kind": "ssl", "strategy": "ema_score", "seed": 0}))
    _round(run, 0, {"map": 0.41, "map50": 0.8, "test_map": 0.4})
    offline = {"pseudo_label_pseudo_precision": 0.7, "pseudo_label_pseudo_recall": 0.6}
    online = {"train_online_pseudo_precision": 0.85, "train_online_pseudo_recall": 0.55}
    _round(run, 1, {"map": 0.45, "pseudo_label_pseudo_labels": 120, **offline, **online})
    lines = ssl_summary(run).splitlines()
    assert lines[0].startswith("ssl ema_score seed 0")
    teacher, student = lines[2].split(), lines[3].split()
    assert teacher[:4] == ["0", "teacher", "0.4100", "0.8000"] and teacher[-3:] == ["-"] * 3
    assert student[1:3] == ["student", "0.4500"] and student[-3:] == ["120", "0.850", "0.550"]


def test_summary_shows_a_rounds_pseudo_labels_per_class_rarest_last(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "ssl-score-s0")
    run.path.mkdir()
    run.run_json.write_text(json.dumps({"kind": "ssl", "strategy": "score", "seed": 0}))
    _round(run, 0, {"map": 0.41})
    _round(run, 1, {"map": 0.45, "pseudo_label_pseudo_labels": 30})
    classes = [
        {"class_id": 0, "name": "cat", "labeled": 4, "pseudo": 10, "gt": 12, "matched": 8,
         "precision": 0.8, "recall": 8 / 12},
        {"class_id": 1, "name": "zebra", "labeled": 40, "pseudo": 20, "gt": 20, "matched": 19,
         "precision": 0.95, "recall": 0.95},
        {"class_id": 2, "name": "okapi", "labeled": 1, "pseudo": 0, "gt": 2, "matched": 0,
         "precision": None, "recall": 0.0},
    ]  # fmt: skip
    run.pseudo_classes_file(1).write_text(json.dumps({"classes": classes}))
    lines = ssl_summary(run).splitlines()
    assert lines[3].split()[1] == "student"
    assert lines[4].split() == ["class", "labeled", "pseudo", "prec", "recall"]
    assert [line.split() for line in lines[5:]] == [
        ["zebra", "40", "20", "0.950", "0.950"],
        ["cat", "4", "10", "0.800", "0.667"],
        ["okapi", "1", "0", "-", "0.000"],
    ]
    # an online teacher's round: its student trained on the mean teacher's labels, which the
    # per-class table (the burn-in teacher's offline pick) does not describe
    _round(run, 2, {"map": 0.46, "train_online_pseudo_precision": 0.9})
    run.pseudo_classes_file(2).write_text(json.dumps({"classes": classes}))
    assert len(ssl_summary(run).splitlines()) == len(lines) + 1
