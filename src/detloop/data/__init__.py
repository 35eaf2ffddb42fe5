"""Everything about images, labels and pool state: schemas, atomic I/O, formats, datasets.

Pure pyarrow/pandas/numpy: importing this package never imports torch or ray.
"""

from detloop.data.errors import DataError
from detloop.data.io import read_json, read_table, write_json, write_table
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir, RunsRoot

__all__ = [
    "DataError",
    "PoolState",
    "RunDir",
    "RunsRoot",
    "read_json",
    "read_table",
    "write_json",
    "write_table",
]
