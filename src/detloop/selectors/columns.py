"""Column access for scores: the "prepare" stage of the selection pipeline (ALGORITHMS §9.3).

``DetColumns`` wraps a predictions table and an optional row mask (the ``min_score`` filter)
and hands out float64 numpy arrays of the kept rows: ``calib`` swaps in the ``*_cal`` twins,
``box_std`` gives the mean corner std in pixels or, relative to the predicted box size, rel(·).
Columns are converted once and cached; the table itself is never copied or filtered whole.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.schema import COORDS

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.signedinteger[Any]]
BoolArray = npt.NDArray[np.bool_]

#: Box sizes are floored at this many pixels before dividing (degenerate, clipped boxes).
MIN_BOX_SIZE: Final = 1e-6

_HEADS: Final = {"al": "loss attenuation (aleatoric)", "mc": "MC dropout (epistemic)"}


class MissingColumnError(ValueError):
    """A score needs a predictions column that is absent or holds nulls."""

    def __init__(self, column: str, problem: str) -> None:
        self.column = column
        super().__init__(f"predictions column {column!r} {problem}")


class NonFiniteColumnError(ValueError):
    """A score reads a predictions column holding ±inf (validated tables never do).

    Attributes:
        column: the stored column.
        count: how many kept rows hold ±inf.
        row: the first such row of the table.
    """

    def __init__(self, column: str, count: int, row: int) -> None:
        self.column = column
        self.count = count
        self.row = row
        what = "value" if count == 1 else "values"
        super().__init__(
            f"predictions column {column!r} holds {count} infinite {what} (first at row {row}); "
            "scores need finite values: validate the table (schema.validate_table) and fix "
            "the predictions that produced it"
        )


def _to_numpy(col: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.generic]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _list_means(col: pa.ChunkedArray | pa.Array) -> FloatArray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0).to_numpy(), dtype=np.int64)
    values = np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.float64)
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), lengths)
    sums = np.bincount(rows, weights=values, minlength=len(arr))
    with np.errstate(invalid="ignore", divide="ignore"):
        means: FloatArray = sums / lengths
    return means


class DetColumns:
    """The kept rows of a predictions table as float64 columns.

    Args:
        table: a predictions table (schema.PREDICTIONS columns).
        calib: read ``<name>_cal`` instead of ``<name>`` for uncertainty columns.
        rows: indices of the kept rows (None: all rows).
    """

    def __init__(self, table: pa.Table, *, calib: bool = False, rows: IntArray | None = None):
        self.table = table
        self.calib = calib
        self.rows = rows
        self._cache: dict[str, FloatArray] = {}
        self._raw: dict[str, npt.NDArray[np.generic]] = {}

    @property
    def n_rows(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    def with_calib(self, calib: bool) -> DetColumns:
        """A view of the same rows reading calibrated (or uncalibrated) columns."""
        if calib == self.calib:
            return self
        return DetColumns(self.table, calib=calib, rows=self.rows)

    def resolve(self, name: str) -> str:
        """The stored column ``name`` reads: its ``_cal`` twin under ``calib``."""
        if self.calib and not name.endswith("_cal") and name not in ("score", *COORDS):
            return f"{name}_cal"
        return name

    def raw(self, name: str) -> npt.NDArray[np.generic]:
        """Column ``name`` (after ``calib`` resolution) of the kept rows in its stored dtype.

        List columns give the mean of each row's list.

        Raises:
            MissingColumnError: the column is absent or holds a null (or NaN) in a kept row.
            NonFiniteColumnError: it holds ±inf in a kept row (a list: in any of its elements).
        """
        stored = self.resolve(name)
        if stored in self._raw:
            return self._raw[stored]
        if stored not in self.table.column_names:
            hint = " (calibrate first, or drop 'calib')" if stored.endswith("_cal") else ""
            raise MissingColumnError(stored, f"is missing from the predictions table{hint}")
        col = self.table.column(stored)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values: npt.NDArray[np.generic] = _list_means(col)
        else:
            values = _to_numpy(col)
        if self.rows is not None:
            values = values[self.rows]
        finite = np.isfinite(values)
        if not finite.all():
            self._refuse(stored, values, finite, col.null_count > 0)
        self._raw[stored] = values
        return values

    def _refuse(
        self, stored: str, values: npt.NDArray[np.generic], finite: BoolArray, has_nulls: bool
    ) -> NoReturn:
        """Raise for the first null/NaN (missing) or, without one, for the ±inf values."""
        nan = np.isnan(values)
        bad = np.flatnonzero(nan if nan.any() else ~finite)
        row = int(bad[0] if self.rows is None else self.rows[bad[0]])
        if not nan.any():
            raise NonFiniteColumnError(stored, len(bad), row)
        head = _HEADS.get(stored.split("_", 1)[0], "")
        why = f"; was the model trained with {head}?" if head and has_nulls else ""
        raise MissingColumnError(stored, f"is null or NaN at row {row}{why}")

    def get(self, name: str) -> FloatArray:
        """Column ``name`` of the kept rows as float64 (see ``raw``)."""
        stored = self.resolve(name)
        if stored not in self._cache:
            self._cache[stored] = np.asarray(self.raw(name), dtype=np.float64)
        return self._cache[stored]

    def sizes(self) -> tuple[FloatArray, FloatArray]:
        """Predicted box width and height (float64), floored at ``MIN_BOX_SIZE``."""
        if "__w" not in self._cache:
            for key, hi, lo in (("__w", "x2", "x1"), ("__h", "y2", "y1")):
                size = np.subtract(self.raw(hi), self.raw(lo), dtype=np.float64)
                np.maximum(size, MIN_BOX_SIZE, out=size)
                self._cache[key] = size
        return self._cache["__w"], self._cache["__h"]

    def box_std(self, head: str, relative: bool, out: FloatArray | None = None) -> FloatArray:
        """Mean over the 4 corners of the ``head`` (``al``/``mc``) std, optionally relative.

        ``relative`` gives rel(head) = mean_k std_k / size_k with size = w for x and h for y.
        Arithmetic is float64 straight from the stored float32 values (no widened copies).
        """
        s_x1, s_y1, s_x2, s_y2 = (self.raw(f"{head}_{c}") for c in COORDS)
        f64 = np.float64
        if out is None:
            out = np.empty(len(s_x1), dtype=f64)
        if not relative:
            np.add(s_x1, s_y1, out=out, dtype=f64)
            np.add(out, s_x2, out=out, dtype=f64)
            np.add(out, s_y2, out=out, dtype=f64)
            out *= 0.25
            return out
        w, h = self.sizes()
        np.add(s_x1, s_x2, out=out, dtype=f64)
        out /= w
        y = np.add(s_y1, s_y2, dtype=f64)
        y /= h
        out += y
        out *= 0.25
        return out

    def image_codes(self) -> IntArray:
        """Per kept row, the index of its image among the sorted distinct image ids."""
        ids = self.table.column("image_id")
        uniq = pc.unique(ids)
        uniq = uniq.take(pc.sort_indices(uniq))
        codes = np.asarray(_to_numpy(pc.index_in(ids, value_set=uniq)), dtype=np.int64)
        return codes if self.rows is None else codes[self.rows]
