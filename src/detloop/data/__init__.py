"""Everything about images, labels and pool state: schemas, atomic I/O, formats, datasets.

Pure pyarrow/pandas/numpy/Pillow: importing this package never imports torch or ray.
"""

from detloop.data.digits import digits_source, make_digits
from detloop.data.errors import DataError
from detloop.data.export import export_coco
from detloop.data.images import decode_images, hash_image, missing_files
from detloop.data.importer import (
    check_files,
    commit,
    decode_pass,
    import_source,
    parse_source,
)
from detloop.data.io import read_json, read_table, write_json, write_table
from detloop.data.merge import ImportReport
from detloop.data.parsed import Parsed
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir, RunsRoot

__all__ = [
    "DataError",
    "ImportReport",
    "Parsed",
    "PoolState",
    "RunDir",
    "RunsRoot",
    "check_files",
    "commit",
    "decode_images",
    "decode_pass",
    "digits_source",
    "export_coco",
    "hash_image",
    "import_source",
    "make_digits",
    "missing_files",
    "parse_source",
    "read_json",
    "read_table",
    "write_json",
    "write_table",
]
