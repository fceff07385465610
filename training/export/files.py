"""Export files: rows streamed to a hidden part file, fsynced, then renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from recsvc.core import tempfiles
from recsvc.core.errors import BadInput

COLUMNS: tuple[str, ...] = (
    "user_id",
    "segment",
    "rank",
    "item_id",
    "title",
    "category",
    "price",
    "score",
    "reason",
    "model_version",
    "export_id",
)


BUNDLE_COLUMNS: tuple[str, ...] = ("bundle_item_ids", "bundle_price")


FORMATS: tuple[str, ...] = ("csv", "jsonl")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def temp_path_for(out: Path, export_id: str) -> Path:
    """Where an export is written before the rename: hidden, and named so it never looks final."""
    return out.with_name(f".{out.name}.{export_id}.part")


class RowWriter:
    """Writes row tables as CSV (pyarrow) or JSON lines to a temp file beside ``out``."""

    def __init__(self, out: Path, export_id: str, fmt: str, schema: pa.Schema):
        if fmt not in FORMATS:
            raise ExportInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out, self.fmt, self.schema = out, fmt, schema
        self.tmp = temp_path_for(out, export_id)
        self._file = open(self.tmp, "wb")
        # A later export removes the file at once if this one dies.
        self._lock: int | None = tempfiles.hold(self.tmp)
        self._csv = None
        if fmt == "csv":
            from pyarrow import csv as pacsv

            self._csv = pacsv.CSVWriter(
                self._file,
                schema,
                write_options=pacsv.WriteOptions(include_header=True, quoting_style="needed"),
            )
        self._json_keys = [json.dumps(name) for name in schema.names]

    def write(self, table: pa.Table) -> None:
        if self._csv is not None:
            self._csv.write_table(table)
            return
        # JSON lines built column-wise by pyarrow: one json.dumps per row would cost more than
        # the ranking. Strings are pre-escaped (see ``json_string``); numbers print as-is.
        parts: list[Any] = []
        for position, (name, column) in enumerate(zip(self._json_keys, table.columns, strict=True)):
            parts.append(("{" if position == 0 else ",") + name + ":")
            parts.append(_json_column(column.combine_chunks()))
        parts.append("}\n")
        lines = pc.binary_join_element_wise(*parts, "")
        whole = pc.binary_join(pa.ListArray.from_arrays([0, len(lines)], lines), "")
        self._file.write(whole[0].as_buffer())

    def commit(self) -> Path:
        self.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.out)
        fsync_dir(self.out.parent)
        clean_stale_parts(self.out)  # also those of exports that died while this one ran
        return self.out

    def close(self) -> None:
        tempfiles.release(self._lock)
        self._lock = None
        if self._file.closed:
            return
        if self._csv is not None:
            self._csv.close()
        self._file.flush()
        self._file.close()

    def abort(self) -> None:
        try:
            self.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _json_column(column: pa.Array) -> pa.Array:
    if pa.types.is_string(column.type):
        # Ids, names and versions need no escaping (id alphabet); titles are escaped once per
        # item before the take (see run_export).
        return pc.if_else(pc.is_null(column), "null", pc.binary_join_element_wise('"', column, '"', ""))
    text = pc.cast(column, pa.string())
    return pc.if_else(pc.is_null(text), "null", text)


def json_string(value: str) -> str:
    """The inside of a JSON string literal (no surrounding quotes)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def clean_stale_parts(out: Path) -> list[Path]:
    """Remove temp files of exports that died, to any file of ``out``'s folder (none is complete).

    A running export holds its temp file's lock (:mod:`recsvc.core.tempfiles`): it is never touched.
    """
    return tempfiles.sweep(out.parent.glob(".*.part"))


def row_schema(with_bundles: bool) -> pa.Schema:
    fields = [
        ("user_id", pa.string()),
        ("segment", pa.string()),
        ("rank", pa.int16()),
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("price", pa.float64()),
        ("score", pa.float64()),
        ("reason", pa.string()),
        ("model_version", pa.string()),
        ("export_id", pa.string()),
    ]
    if with_bundles:
        fields += [("bundle_item_ids", pa.string()), ("bundle_price", pa.float64())]
    return pa.schema(fields)


class ExportInputError(BadInput):
    """Bad input for an export (unknown segment, bad option, missing model...)."""
