"""Image ids (ARCHITECTURE §8, "Ids and tables"): the one rule, and its inverse.

``image_id = <split>/<path of the image relative to its images root, without extension>``:
unique across splits and stable. Only the last extension of the file's base name is removed,
and a base name that starts with its only dot (``.hidden``) keeps it.
"""

from __future__ import annotations


def strip_extension(rel: str) -> str:
    """``rel`` (a POSIX path) without the extension of its base name."""
    dot = rel.rfind(".")
    return rel[:dot] if dot > rel.rfind("/") + 1 else rel


def extension(file: str) -> str:
    """The extension ``strip_extension`` removes from ``file`` (with its dot; may be empty)."""
    return file[len(strip_extension(file)) :]


def image_id(split: str, rel: str) -> str:
    """The id of the image at ``rel`` (relative to its images root) in ``split``."""
    return f"{split}/{strip_extension(rel)}"


def relative_name(image_id: str, file: str) -> str:
    """The inverse of ``image_id``: the path relative to the images root, ``file``'s extension
    included (``pool/a/b`` stored as ``/data/a/b.png`` gives ``a/b.png``)."""
    return image_id.split("/", 1)[1] + extension(file)
