"""Schemas, validated atomic I/O, RunDir layout and PoolState transitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from detloop.data import io, schema
from detloop.data.errors import DataError
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir, RunsRoot, al_run_name


def _images(n: int = 3, **overrides: Any) -> pa.Table:
    cols: dict[str, Any] = {
        "image_id": [f"pool/{i:03d}" for i in range(n)],
        "file": [f"/data/{i:03d}.png" for i in range(n)],
        "width": [64] * n,
        "height": [48] * n,
        "split": ["pool"] * n,
        "state": ["unlabeled"] * n,
        "iteration": [None] * n,
        "phash": pa.array([2**63 + i for i in range(n)], pa.uint64()),
        "source_id": [str(i) for i in range(n)],
        "reason": [None] * n,
    }
    cols.update(overrides)
    return pa.table(cols)


def _gt(image_ids: list[str]) -> pa.Table:
    n = len(image_ids)
    return pa.table(
        {
            "image_id": image_ids,
            "box_id": list(range(n)),
            "class_id": [0] * n,
            "x1": [1.0] * n,
            "y1": [2.0] * n,
            "x2": [5.0] * n,
            "y2": [9.0] * n,
            "area": [28.0] * n,
            "iscrowd": [0] * n,
            "occluded": [-1] * n,
            "truncated": [-1] * n,
            "source_id": [None] * n,
        }
    )


def test_validate_casts_to_canonical_types_and_tags_metadata() -> None:
    out = schema.validate_table(_images(), schema.IMAGES)
    assert out.schema.field("width").type == pa.int32()
    assert out.schema.field("phash").type == pa.uint64()
    assert out.schema.metadata[schema.META_TABLE] == b"images"
    assert out.column_names == schema.IMAGES.column_names


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        (_images().drop_columns(["width"]), "'width': required column is missing"),
        (_images().append_column("extra", pa.array([1, 2, 3])), "'extra': unknown column"),
        (
            _images(state=["unlabeled", "flying", "labeled"]),
            "row 1, column 'state': value 'flying'",
        ),
        (_images(image_id=["a", None, "c"]), "row 1, column 'image_id': null value"),
        (_images(width=["x", "y", "z"]), "'width': cannot be read as int32"),
        (_images(split=["pool", "pool", "train"]), "row 2, column 'split'"),
    ],
)
def test_validation_names_row_and_column(table: pa.Table, needle: str) -> None:
    with pytest.raises(DataError) as info:
        schema.validate_table(table, schema.IMAGES, file="images.parquet")
    assert needle in str(info.value) and "images.parquet" in str(info.value)


def test_validation_reports_several_problems_at_once() -> None:
    table = _images(state=["bad"] * 3).drop_columns(["file"])
    with pytest.raises(DataError) as info:
        schema.validate_table(table, schema.IMAGES)
    assert len(info.value.problems) == 1  # missing columns are reported before values
    table = _images(state=["bad"] * 3, split=["nope"] * 3)
    with pytest.raises(DataError) as info:
        schema.validate_table(table, schema.IMAGES)
    assert {p.column for p in info.value.problems} == {"state", "split"}


def test_every_spec_accepts_its_own_empty_table(tmp_path: Path) -> None:
    for name, spec in schema.TABLES.items():
        path = tmp_path / f"{name}.parquet"
        io.write_table(spec.empty(), spec, path)
        assert io.read_table(spec, path).num_rows == 0


def test_read_refuses_another_table_and_version(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    io.write_table(_images(), schema.IMAGES, path)
    with pytest.raises(DataError, match="holds table 'images', not 'gt'"):
        io.read_table(schema.GT, path)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[schema.META_VERSION] = b"999"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(DataError, match="schema version 999"):
        io.read_table(schema.IMAGES, path)
    with pytest.raises(DataError, match="does not exist"):
        io.read_table(schema.IMAGES, tmp_path / "none.parquet")
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable Parquet"):
        io.read_table(schema.IMAGES, path)


def test_failure_in_the_middle_of_a_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "images.parquet"
    io.write_table(_images(3), schema.IMAGES, path)
    before = path.read_bytes()
    real_write = pq.write_table

    def write_half_then_fail(table: pa.Table, where: Any, **kwargs: Any) -> None:
        real_write(table, where, **kwargs)
        with open(where, "r+b") as fh:  # leave a torn file behind, as a crash would
            fh.truncate(len(before) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(io.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.write_table(_images(5), schema.IMAGES, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert io.read_table(schema.IMAGES, path).num_rows == 3
    assert [p.name for p in tmp_path.iterdir()] == ["images.parquet"]  # no temp file left


def test_invalid_table_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "images.parquet"
    io.write_table(_images(2), schema.IMAGES, path)
    before = path.read_bytes()
    with pytest.raises(DataError):
        io.write_table(_images(2, state=["x", "y"]), schema.IMAGES, path)
    assert path.read_bytes() == before


def test_json_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "a" / "doc.json"
    io.write_json({"x": [1, 2], "p": Path("/q")}, path)
    assert io.read_json(path) == {"x": [1, 2], "p": "/q"}
    path.write_text('{"x": 1,\n "y": }')
    with pytest.raises(DataError, match="line 2 column"):
        io.read_json(path)
    with pytest.raises(DataError, match="does not exist"):
        io.read_json(tmp_path / "none.json")


def test_rundir_layout(tmp_path: Path) -> None:
    root = RunsRoot(tmp_path)
    run = root.run("exp", al_run_name("entropy", 3))
    assert run.path == tmp_path / "exp" / "entropy-s3"
    assert run.images_file == run.path / "pool" / "images.parquet"
    assert run.predictions_file(3) == run.path / "iter_0003" / "predictions.parquet"
    assert root.mlflow_db == tmp_path / "mlflow.db"
    assert run.read_images().num_rows == 0 and run.iterations() == []
    run.checkpoint(2).mkdir(parents=True)
    (run.checkpoint(2) / "metadata.json").write_text("{}")
    run.iteration_dir(5).mkdir()
    assert run.iterations() == [2, 5] and run.latest_checkpoint() == run.checkpoint(2)
    run.write_meta({"seed": 1})
    assert root.runs_of("exp") == [run] and run.read_meta() == {"seed": 1}
    with pytest.raises(ValueError):
        run.iteration_dir(-1)


def test_pool_state_transitions_return_new_states(tmp_path: Path) -> None:
    images = schema.validate_table(_images(4), schema.IMAGES)
    pool = PoolState(images, schema.LABELS.empty())
    gt = schema.validate_table(_gt(["pool/000", "pool/000", "pool/002"]), schema.GT)
    revealed = pool.reveal(gt, ["pool/000", "pool/002"], iteration=1)
    assert pool.counts()["labeled"] == 0  # the original is unchanged
    assert revealed.counts()["labeled"] == 2 and revealed.n_labeled_boxes() == 3
    assert set(revealed.labels["source"].to_pylist()) == {"oracle"}
    assert revealed.ids("unlabeled") == ["pool/001", "pool/003"]
    with pytest.raises(DataError, match="already has labels"):
        revealed.reveal(gt, ["pool/000"], iteration=2)
    examined = revealed.with_state(["pool/001"], "examine", 2, reason="blurry")
    row = examined.images.filter(pc.equal(examined.images["image_id"], "pool/001"))
    assert row["reason"].to_pylist() == ["blurry"] and row["iteration"].to_pylist() == [2]
    with pytest.raises(DataError, match="unknown image ids"):
        pool.with_state(["pool/999"], "queried", 1)
    run = RunDir(tmp_path / "run")
    examined.save(run)
    loaded = PoolState.load(run)
    assert loaded.images.to_pylist() == examined.images.to_pylist()
    assert loaded.labels.to_pylist() == examined.labels.to_pylist()
    assert json.loads(json.dumps(loaded.counts()))["examine"] == 1


# ---- finite float columns --------------------------------------------------------------------


def _preds(n: int = 4) -> pa.Table:
    from detloop.data.synthetic import predictions_from_rows

    return predictions_from_rows([{"image_id": f"i{k}"} for k in range(n)], calibrated=True)


def _set(table: pa.Table, name: str, values: Any, typ: pa.DataType | None = None) -> pa.Table:
    column = values if isinstance(values, pa.ChunkedArray) else pa.array(values, typ)
    return table.set_column(table.schema.get_field_index(name), name, column)


def _problems(table: pa.Table, spec: schema.TableSpec) -> dict[str | None, DataError]:
    with pytest.raises(DataError) as info:
        schema.validate_table(table, spec, file="t.parquet")
    return {p.column: p for p in info.value.problems}


def test_every_float_column_of_predictions_must_be_finite() -> None:
    floats = {f.name for f in (*schema.PREDICTIONS.schema, *schema.PREDICTIONS.optional)}
    floats = {n for n in floats if n not in ("image_id", "det_id", "class_id", "cons_cls")}
    assert set(schema.PREDICTIONS.finite) == floats
    assert {"x1", "y1", "x2", "y2", "area", "weight"} == set(schema.LABELS.finite)
    assert {"score", "u", "delta", "components"} == set(schema.SELECTION.finite)
    with pytest.raises(ValueError, match="'state' is not a float column"):
        schema.TableSpec("t", schema.IMAGES.schema, finite=("state",))


def test_predictions_inf_and_nan_are_refused_with_column_and_count() -> None:
    inf, nan = float("inf"), float("nan")
    table = _set(_preds(), "mc_x1", [1.0, inf, nan, -inf], pa.float32())
    table = _set(table, "entropy_cal", [0.5, 0.5, 0.5, nan], pa.float32())
    problems = _problems(table, schema.PREDICTIONS)
    assert set(problems) == {"mc_x1", "entropy_cal"}  # one problem per column, all at once
    mc = problems["mc_x1"]
    assert mc.row == 1 and mc.file == "t.parquet"
    assert "3 non-finite values (inf/NaN): 1 NaN, 2 ±inf" in str(mc)
    assert problems["entropy_cal"].row == 3
    assert "1 non-finite value (inf/NaN): 1 NaN" in str(problems["entropy_cal"])


@pytest.mark.parametrize("column", ["score", "x2", "entropy", "al_y2", "mc_class"])
def test_one_nan_in_any_predictions_float_column_is_refused(column: str) -> None:
    table = _set(_preds(), column, [0.1, 0.2, 0.3, float("nan")], pa.float32())
    problems = _problems(table, schema.PREDICTIONS)
    assert list(problems) == [column] and problems[column].row == 3


def test_nulls_stay_allowed_in_nullable_uncertainty_columns() -> None:
    table = _preds()
    for name in ("entropy", "mc_class", *schema.AL_COLS, *schema.MC_COLS, "al_x1_cal"):
        table = _set(table, name, [None, 1.0, None, 2.0], pa.float32())
    out = schema.validate_table(table, schema.PREDICTIONS)
    assert out["al_x1"].null_count == 2
    # nulls where the field is required are still a null problem, not a finite one
    table = _set(_preds(), "score", [0.5, None, 0.5, 0.5], pa.float32())
    problems = _problems(table, schema.PREDICTIONS)
    assert "null value in a required column" in str(problems["score"])


def test_list_column_with_one_inf_element_is_refused() -> None:
    typ = pa.list_(pa.float32())
    table = _set(_preds(), "logits", [None, [1.0, 2.0], [], [3.0, float("-inf"), 4.0]], typ)
    problem = _problems(table, schema.PREDICTIONS)["logits"]
    assert problem.row == 3 and "1 non-finite value (inf/NaN): 1 ±inf" in str(problem)
    # a null list over NaN child values is a null, not a NaN
    values = pa.array([1.0, float("nan"), 2.0, 3.0, 4.0], pa.float32())
    offsets = pa.array([0, 1, 2, 3, 5], pa.int32())
    masked = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True, False, False]))
    out = schema.validate_table(_set(_preds(), "mc_class_vec", masked), schema.PREDICTIONS)
    assert out["mc_class_vec"].null_count == 1


def test_first_bad_row_counts_across_chunks() -> None:
    chunks = pa.chunked_array(
        [pa.array([1.0, 2.0], pa.float32()), pa.array([3.0, float("inf")], pa.float32())]
    )
    assert _problems(_set(_preds(), "al_x1", chunks), schema.PREDICTIONS)["al_x1"].row == 3
    typ = pa.list_(pa.float32())
    lists = pa.chunked_array(
        [pa.array([[1.0], [2.0, 3.0]], typ), pa.array([[], [4.0, float("nan")]], typ)]
    )
    assert _problems(_set(_preds(), "logits", lists), schema.PREDICTIONS)["logits"].row == 3


def test_float64_beyond_float32_range_is_named_as_such() -> None:
    table = _set(_preds(), "al_y1", [1.0, 1e39, 2.0, 3.0], pa.float64())
    problem = _problems(table, schema.PREDICTIONS)["al_y1"]
    assert problem.row == 1 and "beyond the float32 range" in str(problem)
    ok = _set(_preds(), "al_y1", [1.0, 3e38, 0.0, 1e-30], pa.float64())  # float32 extremes
    assert schema.validate_table(ok, schema.PREDICTIONS)["al_y1"].null_count == 0


def test_boxes_labels_selection_and_matches_are_finite() -> None:
    gt = _gt(["a", "b"]).set_column(3, "x1", pa.array([1.0, float("nan")]))
    assert _problems(gt, schema.GT)["x1"].row == 1
    selection = pa.table(
        {
            "image_id": ["a", "b", "c"],
            "iteration": pa.array([1, 1, 1], pa.int32()),
            "strategy": ["entropy"] * 3,
            "score": [0.5, None, 0.2],
            "rank": pa.array([0, 2, 1], pa.int32()),
            "selected": [True, False, False],
            "n_det": pa.array([1, 0, 1], pa.int32()),
            "components": pa.array([None, None, None], pa.list_(pa.float64())),
        }
    )
    assert schema.validate_table(selection, schema.SELECTION)["score"].null_count == 1
    nan_score = _set(selection, "score", [0.5, None, float("nan")], pa.float64())
    assert _problems(nan_score, schema.SELECTION)["score"].row == 2
