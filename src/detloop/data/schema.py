"""Arrow schemas of every table detloop stores, defined once.

Each table has a ``TableSpec``: its required columns (an Arrow schema), optional columns
that may be present (calibrated twins, consistency signals), which string columns take a
closed set of values, and a version written into the Parquet metadata. ``validate_table``
checks a table against its spec and returns it cast to the canonical types, raising
``DataError`` naming the file, row and column of the first problems found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.errors import DataError

SCHEMA_VERSION: Final = "1"
META_TABLE: Final = b"detloop.table"
META_VERSION: Final = b"detloop.schema_version"

SPLITS: Final = ("pool", "val", "test")
IMAGE_STATES: Final = (
    "unlabeled",
    "queried",
    "labeled",
    "pseudo",
    "auto_labeled",
    "examine",
    "pruned",
)
LABEL_SOURCES: Final = ("gt", "oracle", "pseudo", "auto")
VERDICTS: Final = ("auto_labeled", "examine")
COORDS: Final = ("x1", "y1", "x2", "y2")

F32 = pa.float32()
F64 = pa.float64()
I8 = pa.int8()
I32 = pa.int32()
I64 = pa.int64()
STR = pa.string()


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


@dataclass(frozen=True)
class TableSpec:
    """What one table must hold.

    Attributes:
        name: table name (also written into the file metadata).
        schema: required columns with canonical types and nullability.
        optional: columns that may be absent; when present they are validated like required ones.
        enums: allowed values of string columns.
    """

    name: str
    schema: pa.Schema
    optional: tuple[pa.Field, ...] = ()
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def empty(self) -> pa.Table:
        """An empty table with this spec's schema and metadata."""
        return with_metadata(self.schema.empty_table(), self)

    def field_for(self, column: str) -> pa.Field | None:
        idx = self.schema.get_field_index(column)
        if idx >= 0:
            return self.schema.field(idx)
        for f in self.optional:
            if f.name == column:
                return f
        return None


# ---- images ---------------------------------------------------------------------------------
IMAGES = TableSpec(
    "images",
    pa.schema(
        [
            _f("image_id", STR),
            _f("file", STR),
            _f("width", I32),
            _f("height", I32),
            _f("split", STR),
            _f("state", STR),
            _f("iteration", I32, nullable=True),
            _f("phash", pa.uint64(), nullable=True),
            _f("source_id", STR, nullable=True),
            _f("reason", STR, nullable=True),
        ]
    ),
    enums={"split": SPLITS, "state": IMAGE_STATES},
)

# ---- ground truth and labels ------------------------------------------------------------------
_BOX_FIELDS = [
    _f("image_id", STR),
    _f("box_id", I64),
    _f("class_id", I32),
    _f("x1", F64),
    _f("y1", F64),
    _f("x2", F64),
    _f("y2", F64),
    _f("area", F64),
    _f("iscrowd", I8),
    _f("occluded", I8),
    _f("truncated", I8),
    _f("source_id", I64, nullable=True),
]

GT = TableSpec("gt", pa.schema(_BOX_FIELDS))

LABELS = TableSpec(
    "labels",
    pa.schema(
        [
            *_BOX_FIELDS,
            _f("source", STR),
            _f("weight", F32),
            _f("iteration", I32, nullable=True),
        ]
    ),
    enums={"source": LABEL_SOURCES},
)

CATEGORIES = TableSpec(
    "categories",
    pa.schema([_f("class_id", I32), _f("name", STR), _f("source_id", I64)]),
)

# ---- predictions (ALGORITHMS §0) -------------------------------------------------------------
AL_COLS: Final = tuple(f"al_{c}" for c in COORDS)
MC_COLS: Final = tuple(f"mc_{c}" for c in COORDS)
UNCERTAINTY_COLS: Final = ("entropy", "mc_class", *AL_COLS, *MC_COLS)
CAL_COLS: Final = tuple(f"{c}_cal" for c in UNCERTAINTY_COLS)

PREDICTIONS = TableSpec(
    "predictions",
    pa.schema(
        [
            _f("image_id", STR),
            _f("det_id", I32),
            _f("class_id", I32),
            _f("score", F32),
            *(_f(c, F32) for c in COORDS),
            _f("entropy", F32, nullable=True),
            _f("mc_class", F32, nullable=True),
            *(_f(c, F32, nullable=True) for c in AL_COLS),
            *(_f(c, F32, nullable=True) for c in MC_COLS),
            _f("logits", pa.list_(F32), nullable=True),
            _f("mc_class_vec", pa.list_(F32), nullable=True),
        ]
    ),
    optional=(
        *(_f(c, F32, nullable=True) for c in CAL_COLS),
        _f("cons_iou", F32, nullable=True),
        _f("cons_cls", pa.bool_(), nullable=True),
    ),
)

# ---- selection (ARCHITECTURE §8) -------------------------------------------------------------
SELECTION = TableSpec(
    "selection",
    pa.schema(
        [
            _f("image_id", STR),
            _f("iteration", I32),
            _f("strategy", STR),
            _f("score", F64, nullable=True),
            _f("rank", I32),
            _f("selected", pa.bool_()),
            _f("n_det", I32),
            _f("components", pa.list_(F64), nullable=True),
        ]
    ),
    optional=(
        _f("u", F64, nullable=True),
        _f("delta", F64, nullable=True),
        _f("verdict", STR, nullable=True),
    ),
    enums={"verdict": VERDICTS},
)

# ---- matches (ALGORITHMS §0) -----------------------------------------------------------------
MATCHES = TableSpec(
    "matches",
    pa.schema(
        [
            _f("image_id", STR),
            _f("gt_id", I64),
            _f("gt_class", I32),
            *(_f(f"gt_{c}", F32) for c in COORDS),
            _f("gt_occl", I8),
            _f("gt_trunc", I8),
            _f("det_id", I32, nullable=True),
            _f("iou", F32),
        ]
    ),
)

TABLES: Final = {
    s.name: s for s in (IMAGES, GT, LABELS, CATEGORIES, PREDICTIONS, SELECTION, MATCHES)
}


def with_metadata(table: pa.Table, spec: TableSpec) -> pa.Table:
    """Attach the table name and schema version to the table's schema metadata."""
    meta = dict(table.schema.metadata or {})
    meta[META_TABLE] = spec.name.encode()
    meta[META_VERSION] = SCHEMA_VERSION.encode()
    return table.replace_schema_metadata(meta)


def _first_bad_row(mask: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first True in a boolean array (caller ensures there is one)."""
    idx = pc.index(mask, True).as_py()
    return int(idx)


def validate_table(table: pa.Table, spec: TableSpec, file: str = "<memory>") -> pa.Table:
    """Check ``table`` against ``spec`` and return it cast to the canonical column types.

    Required columns come first in spec order, then optional ones present, then nothing else:
    unknown columns are an error (they would be silently lost on the next write otherwise).

    Raises:
        DataError: naming the file, the first offending row (when one applies) and column.
    """
    problems: list[DataError] = []
    present = set(table.column_names)
    fields: list[pa.Field] = []
    for f in spec.schema:
        if f.name not in present:
            problems.append(DataError(file, None, f.name, "required column is missing"))
        else:
            fields.append(f)
    optional_names = {f.name for f in spec.optional}
    for f in spec.optional:
        if f.name in present:
            fields.append(f)
    for name in table.column_names:
        if spec.field_for(name) is None and name not in optional_names:
            problems.append(DataError(file, None, name, f"unknown column for table {spec.name!r}"))
    if problems:
        raise DataError.many(problems)

    columns = []
    for f in fields:
        col = table.column(f.name)
        try:
            col = col.cast(f.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems.append(
                DataError(file, None, f.name, f"cannot be read as {f.type}: {exc}".strip())
            )
            continue
        if not f.nullable and col.null_count:
            row = _first_bad_row(col.is_null())
            problems.append(DataError(file, row, f.name, "null value in a required column"))
        allowed = spec.enums.get(f.name)
        if allowed is not None and len(col):
            bad = pc.invert(pc.fill_null(pc.is_in(col, value_set=pa.array(allowed)), True))
            if pc.any(bad).as_py():
                row = _first_bad_row(bad)
                problems.append(
                    DataError(
                        file,
                        row,
                        f.name,
                        f"value {col[row].as_py()!r} is not one of {', '.join(allowed)}",
                    )
                )
        columns.append(col)
    if problems:
        raise DataError.many(problems)
    out = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    return with_metadata(out, spec)
