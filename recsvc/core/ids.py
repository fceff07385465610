"""The id contract shared by training and serving.

Ids are strings of at most 128 characters from ``[A-Za-z0-9._:-]``. They are checked before they
touch a Redis key or a file, so a key can never be forged from user input.
"""

from __future__ import annotations

import re

import numpy as np

MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Model versions become folder names and Redis key parts: the same alphabet, but no leading dot.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_id(value: object) -> bool:
    """Return True when ``value`` is a string that satisfies the id contract."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: object, field: str) -> str:
    """Return ``value`` unchanged, or raise ``ValueError`` naming ``field``."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if not value:
        raise ValueError(f"{field} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if ID_PATTERN.fullmatch(value) is None:
        raise ValueError(f"{field} has characters outside [A-Za-z0-9._:-]")
    return value


def is_valid_version(value: object) -> bool:
    return isinstance(value, str) and VERSION_PATTERN.fullmatch(value) is not None


def valid_id_mask(values: np.ndarray) -> np.ndarray:
    """Vectorised :func:`is_valid_id` over an array of strings (object or unicode dtype)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(values, type=pa.string(), from_pandas=True)
    ok = pc.match_substring_regex(arr, r"^[A-Za-z0-9._:-]{1,128}$")
    return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)
