"""User-facing data errors: every problem names its file, row and column."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 50  # problems spelled out in the message; all of them stay in ``problems``


class DataError(Exception):
    """A problem with stored or imported data.

    Args:
        file: the file (or source) the problem is in.
        row: 0-based row or item index, when one applies.
        column: the column, field or key, when one applies.
        problem: what is wrong, phrased for a person.

    A ``DataError`` may carry several problems (``DataError.many``), so one pass reports
    everything that is wrong with an input instead of the first problem only.
    """

    def __init__(self, file: str, row: int | None, column: str | None, problem: str) -> None:
        self.file = file
        self.row = row
        self.column = column
        self.problem = problem
        self.problems: list[DataError] = [self]
        super().__init__(self.describe())

    def describe(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.problem}"

    @classmethod
    def many(cls, problems: Sequence[DataError]) -> DataError:
        """One error carrying every problem in ``problems`` (which must not be empty)."""
        if not problems:
            raise ValueError("DataError.many needs at least one problem")
        flat = [p for err in problems for p in err.problems]
        first = flat[0]
        err = cls(first.file, first.row, first.column, first.problem)
        err.problems = flat
        err.args = (err.__str__(),)
        return err

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.describe()
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p.describe()}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        return "\n".join(lines)
