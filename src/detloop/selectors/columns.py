"""Column access for scores: the "prepare" stage of the selection pipeline (ALGORITHMS §9.3).

``DetColumns`` wraps a predictions table and an optional row mask (the ``min_score`` filter)
and hands out float64 numpy arrays of the kept rows: ``calib`` swaps in the ``*_cal`` twins,
``box_std`` gives the mean corner std in pixels or, relative to the predicted box size, rel(·).
Columns are converted once and cached; the table itself is never copied or filtered whole.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.schema import COORDS

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Box sizes are floored at this many pixels before dividing (degenerate, clipped boxes).
MIN_BOX_SIZE: Final = 1e-6

_HEADS: Final = {"al": "loss attenuation (aleatoric)", "mc": "MC dropout (epistemic)"}


class MissingColumnError(ValueError):
    """A score needs a predictions column that is absent or holds nulls."""

    def __init__(self, column: str, problem: str) -> None:
        self.column = column
        super().__init__(f"predictions column {column!r} {problem}")


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

    def get(self, name: str) -> FloatArray:
        """Column ``name`` (after ``calib`` resolution) of the kept rows, as float64.

        List columns give the mean of each row's list.

        Raises:
            MissingColumnError: the column is absent or holds a null in a kept row.
        """
        stored = self.resolve(name)
        if stored in self._cache:
            return self._cache[stored]
        if stored not in self.table.column_names:
            hint = " (calibrate first, or drop 'calib')" if stored.endswith("_cal") else ""
            raise MissingColumnError(stored, f"is missing from the predictions table{hint}")
        col = self.table.column(stored)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            raw: npt.NDArray[np.generic] = _list_means(col)
        else:
            raw = _to_numpy(col)
        if self.rows is not None:
            raw = raw[self.rows]  # index the stored (float32) values, then widen
        values = np.asarray(raw, dtype=np.float64)
        nan = np.isnan(values)
        if nan.any():
            bad = np.flatnonzero(nan)
            row = int(bad[0] if self.rows is None else self.rows[bad[0]])
            head = _HEADS.get(stored.split("_", 1)[0], "")
            why = f"; was the model trained with {head}?" if head and col.null_count else ""
            raise MissingColumnError(stored, f"is null or NaN at row {row}{why}")
        self._cache[stored] = values
        return values

    def sizes(self) -> tuple[FloatArray, FloatArray]:
        """Predicted box width and height, floored at ``MIN_BOX_SIZE``."""
        if "__w" not in self._cache:
            self._cache["__w"] = np.maximum(self.get("x2") - self.get("x1"), MIN_BOX_SIZE)
            self._cache["__h"] = np.maximum(self.get("y2") - self.get("y1"), MIN_BOX_SIZE)
        return self._cache["__w"], self._cache["__h"]

    def box_std(self, head: str, relative: bool) -> FloatArray:
        """Mean over the 4 corners of the ``head`` (``al``/``mc``) std, optionally relative.

        ``relative`` gives rel(head) = mean_k std_k / size_k with size = w for x and h for y.
        """
        s_x1, s_y1, s_x2, s_y2 = (self.get(f"{head}_{c}") for c in COORDS)
        if not relative:
            out: FloatArray = s_x1 + s_y1
            out += s_x2
            out += s_y2
            out *= 0.25
            return out
        w, h = self.sizes()
        out = s_x1 + s_x2
        out /= w
        y = s_y1 + s_y2
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
