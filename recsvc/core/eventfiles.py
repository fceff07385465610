"""Load and validate events and catalog files (CSV or Parquet) into columnar in-memory tables.

The contract is :mod:`recsvc.core.contract`; this module applies it vectorised with pyarrow so a file of
millions of rows is validated without a Python loop per row:

* every string column is dictionary-encoded once and its *distinct* values are validated, so the
  id regex runs over thousands of values instead of millions of rows;
* timestamps go through arrow casts and ``strptime`` for the common ISO-8601 shapes, and only the
  distinct leftovers fall back to :func:`recsvc.core.contract.parse_timestamp`;
* each bad row is rejected under the first reason that applies (in :data:`EVENT_REASON_ORDER`),
  counted by reason, and the first rows of every reason are kept with file, line and column.

Duplicates policy: rows that are identical in every field after parsing (user, item, event,
timestamp, order_id, quantity, price, rec_id) are treated as double-logged and kept once;
``LoadReport.duplicates_dropped`` counts the rest. Rows that differ in any field (two views of the
same item a second apart, two lines of one order) are real repeats and all count.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from recsvc.core import contract
from recsvc.core.errors import BadInput
from recsvc.core.events import Catalog, EventTable, duplicate_mask
from recsvc.core.ids import valid_id_mask
from recsvc.core.memory import release_unused_memory

PathLike = str | os.PathLike

#: How many example rows are kept per rejection reason.
EXAMPLES_PER_REASON = 5
#: Longest raw value quoted back in a report (values can be attacker-controlled and huge).
MAX_EXAMPLE_VALUE = 80

#: Reasons for events, in the order they are checked: a row is counted once, under the first.
EVENT_REASON_ORDER: tuple[str, ...] = (
    "malformed_row",
    "missing_field",
    "invalid_user_id",
    "invalid_item_id",
    "unknown_event",
    "invalid_timestamp",
    "invalid_order_id",
    "invalid_rec_id",
    "invalid_quantity",
    "invalid_price",
)
#: Reasons for catalog rows, in check order.
CATALOG_REASON_ORDER: tuple[str, ...] = (
    "malformed_row",
    "missing_field",
    "invalid_item_id",
    "invalid_title",
    "invalid_category",
    "invalid_price",
    "invalid_available",
    "duplicate_item_id",
)
#: Every reason this module can report, with the text printed next to it.
REASONS: dict[str, str] = {
    **contract.REASONS,
    "malformed_row": "the row does not have the header's number of columns",
    "invalid_title": f"title is longer than {contract.MAX_TITLE_LENGTH} characters",
    "invalid_category": f"category is longer than {contract.MAX_CATEGORY_LENGTH} characters",
    "invalid_available": "available is not one of true/false/1/0/yes/no",
    "duplicate_item_id": "item_id already appeared on an earlier catalog row (the first row is kept)",
}

_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


class BadInputError(BadInput):
    """An input file cannot be used. The message names the file, and line and column when known."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, column: str | None = None
    ):
        super().__init__(message)
        self.file, self.line, self.column = file, line, column
        self.field = column


# --------------------------------------------------------------------------------------------
# In-memory tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedRow:
    """One example of a rejected row: where it is and what was wrong."""

    file: str
    line: int | None  # physical line (1 = header) for CSV, row number (1-based) for Parquet
    column: str | None
    reason: str
    value: str

    def location(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} column {self.column}" if self.column else where


@dataclass
class LoadReport:
    """What loading did: rows read, loaded, rejected by reason (with examples), duplicates dropped."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_loaded: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[RejectedRow]] = field(default_factory=dict)
    duplicates_dropped: int = 0
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def bad_fraction(self) -> float:
        return self.rows_rejected / self.rows_read if self.rows_read else 0.0

    def _reject(self, reason: str, count: int, examples: list[RejectedRow]) -> None:
        if count:
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + count
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: EXAMPLES_PER_REASON - len(kept)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (stored as ``manifest["load_report"]``)."""
        return {
            "files": list(self.files),
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "duplicates_dropped": self.duplicates_dropped,
            "ignored_columns": self.ignored_columns,
            "examples": {
                reason: [{"file": r.file, "line": r.line, "column": r.column, "value": r.value} for r in rows]
                for reason, rows in sorted(self.examples.items())
            },
        }

    def format(self) -> str:
        """Human-readable summary, one line per rejection reason plus its first examples."""
        lines = [
            f"read {self.rows_read:,} rows from {len(self.files)} file(s): loaded {self.rows_loaded:,}, "
            f"rejected {self.rows_rejected:,} ({self.bad_fraction:.2%}), "
            f"exact duplicates dropped {self.duplicates_dropped:,}"
        ]
        for reason, count in sorted(self.rejected_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {count:,} rows ({REASONS.get(reason, reason)})")
            for ex in self.examples.get(reason, []):
                lines.append(f"    {ex.location()}: {ex.value}")
        for file, cols in self.ignored_columns.items():
            lines.append(f"  {file}: ignored unknown column(s) {', '.join(cols)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading files into string columns
# --------------------------------------------------------------------------------------------


@dataclass
class _RawFile:
    """One file read as arrow arrays, plus what is needed to turn row positions into lines."""

    path: Path
    name: str
    columns: dict[str, pa.Array]
    n_rows: int
    malformed: list[str]  # raw text of the first rows with the wrong column count
    malformed_count: int
    is_parquet: bool
    _lines: tuple[np.ndarray, np.ndarray] | None = None  # lazily: (data row lines, malformed row lines)
    lines_known: bool = True  # False: rows read by another engine, whose lines we cannot know

    def line_of(self, rows: np.ndarray) -> list[int | None]:
        """Physical line numbers (CSV, header = 1) or 1-based row numbers (Parquet) of data rows."""
        if not self.lines_known:
            return [None for _ in rows]
        if self.is_parquet:
            return [int(r) + 1 for r in rows]
        data_lines, _ = self._line_map()
        if len(data_lines) != self.n_rows:
            return [None for _ in rows]
        return [int(data_lines[r]) for r in rows]

    def malformed_lines(self) -> list[int | None]:
        """Physical line numbers of the malformed rows, in file order (None when unknown)."""
        if not self.lines_known:
            return [None for _ in self.malformed]
        data_lines, bad_lines = self._line_map()
        if len(bad_lines) != self.malformed_count or len(data_lines) != self.n_rows:
            return [None for _ in self.malformed]
        return [int(x) for x in bad_lines[: len(self.malformed)]]

    def _line_map(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lines is None:
            self._lines = _csv_line_numbers(self)
        return self._lines


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _open_text_head(path: Path) -> str:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(1 << 16)
    return head.decode("utf-8-sig", errors="replace")


def _csv_header(path: Path) -> list[str]:
    head = _open_text_head(path)
    first = head.splitlines()[0] if head.strip() else ""
    if not first.strip():
        raise BadInputError(f"{path}:1: the file is empty or has no header row", file=str(path), line=1)
    return [name.strip() for name in next(csv.reader(io.StringIO(first)))]


def check_header(
    name: str, header: Sequence[str], known: Sequence[str], required: Sequence[str], report: LoadReport
) -> list[str]:
    """The ``known`` columns a file has; refuse a repeated or missing required column.

    Columns that are not ``known`` are ignored and listed in ``report.ignored_columns``.

    Raises
    ------
    BadInputError
        Naming the file, line 1 and the column.
    """
    duplicated = sorted({c for c in header if list(header).count(c) > 1})
    if duplicated:
        raise BadInputError(
            f"{name}:1 column {duplicated[0]}: the header names this column twice",
            file=name,
            line=1,
            column=duplicated[0],
        )
    for col in required:
        if col not in header:
            raise BadInputError(
                f"{name}:1 column {col}: required column is missing (header is: {', '.join(header)[:200]})",
                file=name,
                line=1,
                column=col,
            )
    ignored = [c for c in header if c not in known]
    if ignored:
        report.ignored_columns[name] = ignored
    return [c for c in known if c in header]


def _read_file(
    path: Path,
    known: Sequence[str],
    required: Sequence[str],
    report: LoadReport,
    dictionary: Sequence[str] = (),
) -> _RawFile:
    """Read ``known`` columns of one CSV/Parquet file as arrow arrays (strings for CSV).

    CSV columns named in ``dictionary`` are read dictionary-encoded (per block of the file):
    ids repeat, so a column of millions of rows is held as int32 codes and its distinct strings
    instead of every row's string -- the largest part of the load's peak memory otherwise.
    """
    name = str(path)
    if not path.exists():
        raise BadInputError(f"{name}: file not found", file=name)
    if path.is_dir():
        raise BadInputError(f"{name}: is a directory, expected a CSV or Parquet file", file=name)
    try:
        if _is_parquet(path):
            header = [str(c) for c in pq.read_schema(path).names]
        else:
            header = _csv_header(path)
    except BadInputError:
        raise
    except (OSError, pa.ArrowException, UnicodeError, csv.Error) as e:
        raise BadInputError(f"{name}: cannot read the header ({e})", file=name, line=1) from None
    present = check_header(name, header, known, required, report)

    if _is_parquet(path):
        try:
            table = pq.read_table(path, columns=present)
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(f"{name}: cannot read Parquet ({e})", file=name) from None
        columns = {c: table.column(c) for c in present}
        return _RawFile(path, name, columns, table.num_rows, [], 0, True)

    malformed: list[str] = []  # the first few, for the report; the rest are only counted
    malformed_count = 0

    def on_invalid_row(row: Any) -> str:
        nonlocal malformed_count
        malformed_count += 1
        if len(malformed) < EXAMPLES_PER_REASON:
            malformed.append(row.text[: MAX_EXAMPLE_VALUE * 2])
        return "skip"

    try:
        table = pa_csv.read_csv(
            path,
            # Our own (stripped) header names: " item_id" in a header still means item_id.
            read_options=pa_csv.ReadOptions(
                use_threads=True, block_size=1 << 24, column_names=header, skip_rows=1
            ),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid_row),
            convert_options=pa_csv.ConvertOptions(
                column_types={
                    c: pa.dictionary(pa.int32(), pa.string()) if c in dictionary else pa.string()
                    for c in header
                },
                include_columns=present,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (OSError, pa.ArrowException) as e:
        raise BadInputError(f"{name}: cannot parse CSV ({e})", file=name) from None
    # Columns stay chunked: every arrow kernel used below works chunk by chunk, and copying
    # millions of strings into one buffer would only cost time.
    columns = {c: table.column(c) for c in present}
    release_unused_memory()  # the reader's buffers: parsing would pile up on top of them
    return _RawFile(path, name, columns, table.num_rows, malformed, malformed_count, False)


def _csv_line_numbers(raw: _RawFile) -> tuple[np.ndarray, np.ndarray]:
    """Physical line numbers of the good data rows and of the malformed rows (only on error).

    Rows are the non-empty lines after the header. A quoted value spanning lines breaks the
    correspondence; the counts then disagree and the caller reports no line.
    """
    empty = np.zeros(0, dtype=np.int64)
    if raw.path.suffix.lower() == ".gz":
        return empty, empty
    data = np.fromfile(raw.path, dtype=np.uint8)
    if not len(data):
        return empty, empty
    newline = np.flatnonzero(data == 10)
    starts = np.concatenate(([0], newline + 1))
    ends = np.concatenate((newline, [len(data)]))
    lengths = ends - starts
    first_byte = data[np.minimum(starts, len(data) - 1)]
    blank = (lengths == 0) | ((lengths == 1) & (first_byte == 13))  # "" or a lone "\r"
    non_empty = np.flatnonzero(~blank) + 1  # 1-based line numbers
    rows = non_empty[1:]  # the first non-empty line is the header
    if not raw.malformed_count:
        return rows, empty
    ordinals = np.asarray(_malformed_row_numbers(raw.path), dtype=np.int64)
    ordinals = ordinals[(ordinals >= 0) & (ordinals < len(rows))]
    keep = np.ones(len(rows), dtype=bool)
    keep[ordinals] = False
    return rows[keep], rows[ordinals]


def _malformed_row_numbers(path: Path) -> list[int]:
    """0-based data-row ordinals of malformed rows (a slower serial re-read, only on error)."""
    numbers: list[int] = []

    def handler(row: Any) -> str:
        numbers.append(int(row.number) - 2 if row.number is not None else -1)  # number 1 = header
        return "skip"

    pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(use_threads=False),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=handler),
        convert_options=pa_csv.ConvertOptions(include_columns=[], strings_can_be_null=False),
    )
    return numbers


# --------------------------------------------------------------------------------------------
# Vectorised column parsing
# --------------------------------------------------------------------------------------------


def _as_string(arr: pa.Array) -> pa.Array:
    """String view of any arrow column (Parquet may hold ints for ids); nulls become ""."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_floating(arr.type):
        # 12.0 -> "12": float ids come from spreadsheets/pandas; their integral values are the ids.
        as_int = pc.cast(arr, pa.int64(), safe=False)
        integral = pc.fill_null(pc.equal(pc.cast(as_int, arr.type), arr), False)
        arr = pc.if_else(integral, pc.cast(as_int, pa.string()), pc.cast(arr, pa.string()))
    elif not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    return pc.fill_null(arr, "") if arr.null_count else arr


@dataclass
class _Encoded:
    codes: np.ndarray  # int32 per row
    values: np.ndarray  # object array of distinct strings


def _encode(arr: pa.Array | pa.ChunkedArray) -> _Encoded:
    if _string_dictionary(arr) and not arr.null_count:
        encoded = arr  # read dictionary-encoded: the codes are there already
    else:
        encoded = pc.dictionary_encode(_as_string(arr))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = _one_dictionary(encoded)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    values = np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
    return _Encoded(codes, values)


def _string_dictionary(arr: pa.Array | pa.ChunkedArray) -> bool:
    kind = arr.type
    return pa.types.is_dictionary(kind) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    )


def _one_dictionary(encoded: pa.ChunkedArray) -> pa.DictionaryArray:
    """One DictionaryArray from a chunked encoding.

    Arrow's hash kernel gives every chunk of a chunked input the same final dictionary, which
    makes concatenation free; should a build ever hand back per-chunk dictionaries, they are
    unified (slower, still correct).
    """
    if encoded.num_chunks == 0:
        return pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), pa.array([], pa.string()))
    first = encoded.chunk(0).dictionary
    if all(chunk.dictionary is first or chunk.dictionary.equals(first) for chunk in encoded.chunks[1:]):
        return pa.DictionaryArray.from_arrays(
            pa.chunked_array([chunk.indices for chunk in encoded.chunks]).combine_chunks(), first
        )
    unified = pa.table({"c": encoded}).unify_dictionaries().column("c")
    return unified.combine_chunks()


def _id_checks(enc: _Encoded) -> tuple[np.ndarray, np.ndarray]:
    """(empty, invalid) boolean masks per row, computed on the distinct values."""
    empty_values = enc.values == ""
    valid_values = valid_id_mask(enc.values) if len(enc.values) else np.zeros(0, bool)
    return empty_values[enc.codes], (~valid_values & ~empty_values)[enc.codes]


_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%d %H:%M:%S%z",
    "%Y-%m-%d",
)


def _parse_timestamps(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(seconds int64, ok, empty)`` per row for a timestamp column of any arrow type."""
    n = len(arr)
    seconds = np.zeros(n, dtype=np.int64)
    if pa.types.is_timestamp(arr.type):
        # Arrow timestamps are UTC instants whatever their zone; naive ones are taken as UTC.
        per_second = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}[arr.type.unit]
        empty = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        raw = pc.fill_null(pc.cast(arr, pa.int64()), 0).to_numpy(zero_copy_only=False)
        return _seconds_in_range(raw // per_second, ~empty) + (empty,)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        empty = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        as_float = pc.fill_null(pc.cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        return _seconds_in_range(as_float, ~empty) + (empty,)

    strings = _as_string(arr)
    empty = np.asarray(pc.equal(pc.utf8_length(strings), 0).to_numpy(zero_copy_only=False), dtype=bool)
    ok = np.zeros(n, dtype=bool)
    # Fast path: the whole column is integral Unix seconds.
    if not empty.any():
        try:
            as_int = pc.cast(strings, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            as_int = None
        if as_int is not None:
            if (
                len(as_int)
                and contract.MIN_TIMESTAMP <= as_int.min()
                and as_int.max() < contract.MAX_TIMESTAMP
            ):
                return as_int.astype(np.int64, copy=False), np.ones(n, dtype=bool), empty  # all seconds
            secs, ok = contract.epoch_seconds(as_int)
            return secs, ok, empty
    todo = ~empty
    numeric = np.asarray(
        pc.fill_null(pc.match_substring_regex(strings, r"^\s*[0-9]+(\.[0-9]*)?\s*$"), False).to_numpy(
            zero_copy_only=False
        ),
        dtype=bool,
    )
    if numeric.any():
        idx = np.flatnonzero(numeric)
        vals = pc.cast(pc.utf8_trim_whitespace(strings.take(pa.array(idx))), pa.float64()).to_numpy(
            zero_copy_only=False
        )
        secs, good = _seconds_in_range(vals, np.ones(len(idx), bool))
        seconds[idx], ok[idx] = secs, good
        todo &= ~numeric
    if todo.any():
        idx = np.flatnonzero(todo)
        # Fractions of a second are truncated, as contract.parse_timestamp does.
        subset = pc.replace_substring_regex(
            pc.utf8_trim_whitespace(strings.take(pa.array(idx))), r"(\d\d:\d\d:\d\d)\.\d+", r"\1"
        )
        parsed = np.full(len(idx), np.iinfo(np.int64).min, dtype=np.int64)
        for fmt in _ISO_FORMATS:
            left = parsed == np.iinfo(np.int64).min
            if not left.any():
                break
            li = np.flatnonzero(left)
            got = pc.strptime(subset.take(pa.array(li)), format=fmt, unit="s", error_is_null=True)
            got = pc.cast(got.cast(pa.timestamp("s")), pa.int64())
            got_np = got.to_numpy(zero_copy_only=False)
            hit = ~np.asarray(got.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            parsed[li[hit]] = got_np[hit].astype(np.int64)
        found = parsed != np.iinfo(np.int64).min
        secs, good = _seconds_in_range(parsed.astype(np.float64), found)
        seconds[idx], ok[idx] = secs, good
        # Anything else (other ISO-8601 shapes, scientific notation): the reference parser, once per
        # distinct value.
        rest = idx[~found]
        if len(rest):
            enc = _encode(strings.take(pa.array(rest)))
            parsed_values = np.zeros(len(enc.values), dtype=np.int64)
            good_values = np.zeros(len(enc.values), dtype=bool)
            for j, text in enumerate(enc.values):
                try:
                    parsed_values[j] = contract.parse_timestamp(text)
                    good_values[j] = True
                except (ValueError, TypeError, OverflowError):
                    pass
            seconds[rest], ok[rest] = parsed_values[enc.codes], good_values[enc.codes]
    return seconds, ok, empty


def _seconds_in_range(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seconds, ok = contract.epoch_seconds(values)
    return seconds, ok & present


def _parse_numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(float64 values, parsed, empty)`` per row; unparseable values are not ``parsed``."""
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
        empty = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        vals = pc.fill_null(pc.cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        return vals, ~empty, empty
    strings = _as_string(arr)
    if len(strings) and pc.max(pc.binary_length(strings)).as_py() == 0:  # an empty column: no value
        return np.zeros(len(strings)), np.zeros(len(strings), dtype=bool), np.ones(len(strings), dtype=bool)
    strings = pc.utf8_trim_whitespace(strings)
    blank = pc.equal(pc.utf8_length(strings), 0)
    empty = np.asarray(blank.to_numpy(zero_copy_only=False), dtype=bool)
    try:
        # Fast path: every non-empty value is a plain number.
        vals = pc.cast(pc.if_else(blank, pa.scalar(None, pa.string()), strings), pa.float64())
        out = pc.fill_null(vals, 0.0).to_numpy(zero_copy_only=False)
        return out, ~empty, empty
    except pa.ArrowInvalid:
        pass
    enc = _encode(strings)
    values = np.zeros(len(enc.values), dtype=np.float64)
    parsed = np.zeros(len(enc.values), dtype=bool)
    for j, text in enumerate(enc.values):
        try:
            values[j] = float(text)
            parsed[j] = text != ""
        except ValueError:
            pass
    return values[enc.codes], parsed[enc.codes] & ~empty, empty


def _price_column(cols: Mapping[str, Any], n: int, rej: _Rejections) -> np.ndarray:
    """float32 prices (NaN where empty or rejected); bad values are marked ``invalid_price``."""
    if "price" not in cols:
        return np.full(n, np.nan, np.float32)
    value, parsed, empty = _parse_numbers(cols["price"])
    bad = ~empty & ~(parsed & np.isfinite(value) & (value >= 0))
    rej.mark("invalid_price", bad, "price")
    return np.where(empty | bad, np.nan, value).astype(np.float32)


def _parse_bool(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(value, ok)`` per row; empty means the default, true."""
    if pa.types.is_boolean(arr.type):
        return np.asarray(pc.fill_null(arr, True).to_numpy(zero_copy_only=False), dtype=bool), np.ones(
            len(arr), bool
        )
    if pa.types.is_integer(arr.type):
        ints = pc.fill_null(arr, 1).to_numpy(zero_copy_only=False)
        return ints != 0, np.isin(ints, (0, 1))
    enc = _encode(pc.utf8_lower(pc.utf8_trim_whitespace(_as_string(arr))))
    value = np.array([v in _TRUE or v == "" for v in enc.values], dtype=bool)
    ok = np.array([v in _TRUE or v in _FALSE or v == "" for v in enc.values], dtype=bool)
    return value[enc.codes], ok[enc.codes]


# --------------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------------


class _Rejections:
    """Per-row reason codes for ``n_rows`` rows; the first reason in ``order`` that applies wins."""

    def __init__(self, n_rows: int, order: Sequence[str]):
        self.n_rows, self.order = n_rows, order
        self.code = {reason: i + 1 for i, reason in enumerate(order)}
        self._marks: list[tuple[str, np.ndarray, str | np.ndarray]] = []

    def mark(self, reason: str, mask: np.ndarray, column: str | np.ndarray) -> None:
        """Flag ``mask`` rows with ``reason``; ``column`` names the offending column (or per row)."""
        self._marks.append((reason, mask, column))

    def marked(self) -> np.ndarray:
        """Rows flagged with any reason so far."""
        out = np.zeros(self.n_rows, dtype=bool)
        for _, mask, _ in self._marks:
            out |= mask
        return out

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(reason code per row (int8, 0 = good), offending column per row)`` by priority."""
        reason = np.zeros(self.n_rows, dtype=np.int8)
        columns = np.empty(self.n_rows, dtype=object)
        for name, mask, column in sorted(self._marks, key=lambda m: -self.code[m[0]]):
            reason[mask] = self.code[name]
            columns[mask] = column[mask] if isinstance(column, np.ndarray) else column
        return reason, columns

    def finish(self, report: LoadReport, raw: _RawFile) -> np.ndarray:
        """Apply marks by priority, record counts and examples; return the mask of good rows."""
        reason, columns = self.resolve()
        if raw.malformed_count:
            lines = raw.malformed_lines()
            examples = [
                RejectedRow(raw.name, line, None, "malformed_row", _quote(text))
                for text, line in zip(raw.malformed[:EXAMPLES_PER_REASON], lines, strict=False)
            ]
            report._reject("malformed_row", raw.malformed_count, examples)
        counts = np.bincount(reason, minlength=len(self.order) + 1)
        for name in self.order:
            code = self.code[name]
            if name == "malformed_row" or not counts[code]:
                continue
            rows = np.flatnonzero(reason == code)[:EXAMPLES_PER_REASON]
            lines = raw.line_of(rows)
            examples = []
            for row, line in zip(rows, lines, strict=True):
                col = columns[row]
                value = raw.columns[col][int(row)].as_py() if col in raw.columns else None
                examples.append(RejectedRow(raw.name, line, col, name, _quote(value)))
            report._reject(name, int(counts[code]), examples)
        return reason == 0


def _quote(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_EXAMPLE_VALUE:
        text = text[:MAX_EXAMPLE_VALUE] + "..."
    return repr(text)


def check_bad_fraction(report: LoadReport, max_bad_fraction: float, what: str) -> None:
    """Raise :class:`BadInputError` when no row is valid or more than ``max_bad_fraction`` are bad."""
    if report.rows_read and report.rows_loaded == 0:
        raise BadInputError(
            _bad_summary(report, f"{', '.join(report.files)}: no valid {what} rows"),
            **_first_location(report),
        )
    if report.bad_fraction > max_bad_fraction:
        head = (
            f"{', '.join(report.files)}: {report.rows_rejected:,} of {report.rows_read:,} {what} rows "
            f"({report.bad_fraction:.2%}) are invalid, "
            f"more than the allowed {max_bad_fraction:.2%} (--max-bad-fraction); nothing was written"
        )
        raise BadInputError(_bad_summary(report, head), **_first_location(report))


def _first_location(report: LoadReport) -> dict[str, Any]:
    for reason in sorted(report.rejected_by_reason, key=lambda r: -report.rejected_by_reason[r]):
        for ex in report.examples.get(reason, []):
            return {"file": ex.file, "line": ex.line, "column": ex.column}
    return {}


def _bad_summary(report: LoadReport, head: str) -> str:
    lines = [head]
    for reason, count in sorted(report.rejected_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {count:,} rows ({REASONS.get(reason, reason)})")
        for ex in report.examples.get(reason, [])[:3]:
            lines.append(f"    {ex.location()}: {ex.value}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------

_EVENT_COLUMNS = contract.EVENT_REQUIRED + contract.EVENT_OPTIONAL
_DICTIONARY_COLUMNS = ("user_id", "item_id", "event", "order_id", "rec_id")  # few distinct values


@dataclass
class _ParsedEvents:
    user: _Encoded
    item: _Encoded
    order: _Encoded
    rec: _Encoded
    event: np.ndarray
    timestamp: np.ndarray
    quantity: np.ndarray
    price: np.ndarray

    def take(self, rows: np.ndarray) -> _ParsedEvents:
        return _ParsedEvents(
            user=_Encoded(self.user.codes[rows], self.user.values),
            item=_Encoded(self.item.codes[rows], self.item.values),
            order=_Encoded(self.order.codes[rows], self.order.values),
            rec=_Encoded(self.rec.codes[rows], self.rec.values),
            event=self.event[rows],
            timestamp=self.timestamp[rows],
            quantity=self.quantity[rows],
            price=self.price[rows],
        )


def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise BadInputError("no events file given")
    return out


def _event_marks(cols: Mapping[str, Any], n: int) -> tuple[_Rejections, _ParsedEvents]:
    """Every contract check of the event columns: the marks, and every row parsed (none dropped)."""
    rej = _Rejections(n, EVENT_REASON_ORDER)

    user = _encode(cols["user_id"])
    item = _encode(cols["item_id"])
    user_empty, user_bad = _id_checks(user)
    item_empty, item_bad = _id_checks(item)

    event_enc = _encode(cols["event"])
    event_values = np.array([contract.EVENT_CODE.get(v, -1) for v in event_enc.values], dtype=np.int8)
    event = event_values[event_enc.codes] if n else np.zeros(0, np.int8)
    event_empty = (event_enc.values == "")[event_enc.codes] if n else np.zeros(0, bool)

    timestamp, ts_ok, ts_empty = _parse_timestamps(cols["timestamp"])

    # Required fields: the first empty one (in contract order) is the one reported.
    required = (
        ("user_id", user_empty),
        ("item_id", item_empty),
        ("event", event_empty),
        ("timestamp", ts_empty),
    )
    any_missing = user_empty | item_empty | event_empty | ts_empty
    missing_column: str | np.ndarray = "user_id"  # (no row is marked when none is missing)
    if any_missing.any():
        missing_column = np.full(n, None, dtype=object)
        for name, empty in reversed(required):
            missing_column[empty] = name
    rej.mark("missing_field", any_missing, missing_column)
    rej.mark("invalid_user_id", user_bad, "user_id")
    rej.mark("invalid_item_id", item_bad, "item_id")
    rej.mark("unknown_event", (event < 0) & ~event_empty, "event")
    rej.mark("invalid_timestamp", ~ts_ok & ~ts_empty, "timestamp")

    optional_ids = {}
    for name, reason in (("order_id", "invalid_order_id"), ("rec_id", "invalid_rec_id")):
        if name in cols:
            enc = _encode(cols[name])
            _, bad = _id_checks(enc)
            rej.mark(reason, bad, name)
        else:
            enc = _Encoded(np.zeros(n, np.int32), np.array([""], dtype=object))
        optional_ids[name] = enc

    if "quantity" in cols:
        qty, parsed, empty = _parse_numbers(cols["quantity"])
        bad = ~empty & ~(parsed & np.isfinite(qty) & (qty >= 0) & (qty <= contract.MAX_QUANTITY))
        rej.mark("invalid_quantity", bad, "quantity")
        quantity = np.where(empty, 1.0, qty).astype(np.float32)
    else:
        quantity = np.ones(n, np.float32)
    price = _price_column(cols, n, rej)
    result = _ParsedEvents(
        user=user,
        item=item,
        order=optional_ids["order_id"],
        rec=optional_ids["rec_id"],
        event=event,
        timestamp=timestamp,
        quantity=quantity,
        price=price,
    )
    return rej, result


def _parse_events_file(raw: _RawFile, report: LoadReport) -> _ParsedEvents:
    rej, parsed = _event_marks(raw.columns, raw.n_rows)
    good = rej.finish(report, raw)
    return parsed if good.all() else parsed.take(good)


@dataclass
class EventBatch:
    """A batch of event rows after the contract checks, every row kept (see :func:`validate_event_columns`).

    ``reason`` is 0 for a good row, else ``k`` for ``EVENT_REASON_ORDER[k - 1]``; ``column`` names the
    offending column and ``value`` quotes its raw value (as the load report does) for bad rows. The
    other arrays are the parsed fields, meaningful for good rows.
    """

    reason: np.ndarray  # int8
    column: np.ndarray  # object: str or None
    value: np.ndarray  # object: str or None
    user_id: np.ndarray
    item_id: np.ndarray
    event: np.ndarray
    timestamp: np.ndarray
    order_id: np.ndarray
    quantity: np.ndarray
    price: np.ndarray
    rec_id: np.ndarray


def validate_event_columns(
    columns: Mapping[str, Any], n_rows: int, malformed: np.ndarray | None = None
) -> EventBatch:
    """Apply the events contract to one batch of columns, as :func:`load_events` does to a file.

    For engines that read the files themselves and validate in parallel (the Spark engine runs this
    on every partition): the same checks, reasons and priorities as the file loader, so rejection
    counts agree. Counting, examples and exact-duplicate removal are left to the caller.

    Parameters
    ----------
    columns : mapping of name to arrow array
        ``user_id, item_id, event, timestamp`` and any of ``order_id, quantity, price, rec_id``, raw
        (strings from CSV, or typed from Parquet).
    n_rows : int
    malformed : numpy.ndarray, optional
        Rows the reader could not split into the header's columns (reason ``malformed_row``; their
        raw text is expected in ``columns["_corrupt_record"]`` for the example).

    Returns
    -------
    EventBatch
    """
    rej, parsed = _event_marks(columns, n_rows)
    if malformed is not None:
        rej.mark("malformed_row", np.asarray(malformed, dtype=bool), "_corrupt_record")
    reason, column = rej.resolve()
    value = np.full(n_rows, None, dtype=object)
    for row in np.flatnonzero(reason):
        name = column[row]
        raw = columns[name][int(row)].as_py() if name in columns else None
        value[row] = _quote(raw)
    column[reason == 0] = None
    return EventBatch(
        reason=reason,
        column=column,
        value=value,
        user_id=parsed.user.values[parsed.user.codes],
        item_id=parsed.item.values[parsed.item.codes],
        event=parsed.event,
        timestamp=parsed.timestamp,
        order_id=parsed.order.values[parsed.order.codes],
        quantity=parsed.quantity,
        price=parsed.price,
        rec_id=parsed.rec.values[parsed.rec.codes],
    )


def _merge_encoded(parts: Sequence[_Encoded]) -> _Encoded:
    """Concatenate per-file encodings into one with a shared dictionary."""
    if len(parts) == 1:
        return parts[0]
    all_values = np.concatenate([p.values for p in parts])
    merged = _encode(pa.array(all_values, type=pa.string()))
    codes, offset = [], 0
    for p in parts:
        remap = merged.codes[offset : offset + len(p.values)]
        codes.append(remap[p.codes])
        offset += len(p.values)
    return _Encoded(np.concatenate(codes).astype(np.int32), merged.values)


def _compact(enc: _Encoded) -> _Encoded:
    """Drop dictionary values no row uses (rejected rows leave theirs behind)."""
    used = np.bincount(enc.codes, minlength=len(enc.values)) > 0
    if used.all():
        return enc
    remap = np.cumsum(used, dtype=np.int64) - 1
    return _Encoded(remap[enc.codes].astype(np.int32), enc.values[used])


def load_events(
    paths: PathLike | Iterable[PathLike], *, max_bad_fraction: float = 0.01
) -> tuple[EventTable, LoadReport]:
    """Load and validate one or more events files (CSV or Parquet) into an :class:`EventTable`.

    Parameters
    ----------
    paths : path or iterable of paths
        Events files with a header row: ``user_id, item_id, event, timestamp`` and optionally
        ``order_id, quantity, price, rec_id``; other columns are ignored (and reported).
    max_bad_fraction : float, default 0.01
        Largest share of rejected rows (over all files) that is tolerated.

    Returns
    -------
    (EventTable, LoadReport)
        The good rows, exact duplicates dropped, and a report of everything rejected.

    Raises
    ------
    BadInputError
        A file is missing or unreadable, a required column is missing, no row is valid, or more
        than ``max_bad_fraction`` of the rows are bad. The message names file, line and column.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError("max_bad_fraction must be between 0 and 1")
    report = LoadReport()
    parsed: list[_ParsedEvents] = []
    for path in _as_paths(paths):
        raw = _read_file(path, _EVENT_COLUMNS, contract.EVENT_REQUIRED, report, _DICTIONARY_COLUMNS)
        report.files.append(raw.name)
        report.rows_read += raw.n_rows + raw.malformed_count
        parsed.append(_parse_events_file(raw, report))
        del raw
    report.rows_loaded = sum(len(p.event) for p in parsed)
    if report.rows_read == 0:
        raise BadInputError(
            f"{', '.join(report.files)}: no event rows after the header", file=report.files[0], line=2
        )
    check_bad_fraction(report, max_bad_fraction, "event")

    user = _compact(_merge_encoded([p.user for p in parsed]))
    item = _compact(_merge_encoded([p.item for p in parsed]))
    order = _compact(_merge_encoded([p.order for p in parsed]))
    rec = _compact(_merge_encoded([p.rec for p in parsed]))
    event = np.concatenate([p.event for p in parsed])
    timestamp = np.concatenate([p.timestamp for p in parsed])
    quantity = np.concatenate([p.quantity for p in parsed])
    price = np.concatenate([p.price for p in parsed])
    del parsed

    dup = duplicate_mask(
        [
            user.codes,
            item.codes,
            timestamp,
            event,
            order.codes,
            rec.codes,
            quantity.view(np.uint32),
            price.view(np.uint32),
        ]
    )
    if dup.any():
        keep = ~dup
        report.duplicates_dropped = int(dup.sum())
        user, item, order, rec = (_Encoded(e.codes[keep], e.values) for e in (user, item, order, rec))
        event, timestamp, quantity, price = event[keep], timestamp[keep], quantity[keep], price[keep]
    report.rows_loaded = len(event)

    table = EventTable(
        user_id=user.values[user.codes],
        item_id=item.values[item.codes],
        event=event,
        timestamp=timestamp,
        order_id=order.values[order.codes],
        quantity=quantity,
        price=price,
        rec_id=rec.values[rec.codes],
    )
    table._codes = {
        "user_id": (user.codes, user.values),
        "item_id": (item.codes, item.values),
        "order_id": (order.codes, order.values),
        "rec_id": (rec.codes, rec.values),
    }
    # The raw columns are gone: their pages go back before the next stages pile up on them.
    release_unused_memory()
    return table, report


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------

_CATALOG_COLUMNS = contract.CATALOG_REQUIRED + contract.CATALOG_OPTIONAL


def load_catalog(path: PathLike, *, max_bad_fraction: float = 0.01) -> tuple[Catalog, LoadReport]:
    """Load and validate a catalog file (CSV or Parquet).

    Parameters
    ----------
    path : path
        Catalog with a header row: ``item_id`` and optionally ``title, category, price, available``.
    max_bad_fraction : float, default 0.01
        Largest share of rejected rows that is tolerated.

    Returns
    -------
    (Catalog, LoadReport)
        Valid items in file order (the first row of a repeated ``item_id`` wins) and the report.

    Raises
    ------
    BadInputError
        As for :func:`load_events`.
    """
    report = LoadReport()
    raw = _read_file(Path(path), _CATALOG_COLUMNS, contract.CATALOG_REQUIRED, report)
    return _validate_catalog(raw, report, max_bad_fraction)


def catalog_from_table(
    table: pa.Table, name: str, *, malformed: Sequence[str] = (), max_bad_fraction: float = 0.01
) -> tuple[Catalog, LoadReport]:
    """Validate a catalog another engine has read (rows in file order), as :func:`load_catalog` does.

    Parameters
    ----------
    table : pyarrow.Table
        The catalog's columns (``item_id`` required), raw: strings from CSV or typed from Parquet.
    name : str
        Where it came from (a URI), for the report.
    malformed : sequence of str
        Raw text of rows the reader could not split into the header's columns (already dropped
        from ``table``).
    max_bad_fraction : float, default 0.01

    Raises
    ------
    BadInputError
        As for :func:`load_catalog`; examples name the source and column (lines are unknown).
    """
    report = LoadReport()
    present = check_header(name, table.column_names, _CATALOG_COLUMNS, contract.CATALOG_REQUIRED, report)
    raw = _RawFile(
        path=Path(name),
        name=name,
        columns={c: table.column(c) for c in present},
        n_rows=table.num_rows,
        malformed=list(malformed[:EXAMPLES_PER_REASON]),
        malformed_count=len(malformed),
        is_parquet=False,
        lines_known=False,
    )
    return _validate_catalog(raw, report, max_bad_fraction)


def _validate_catalog(
    raw: _RawFile, report: LoadReport, max_bad_fraction: float
) -> tuple[Catalog, LoadReport]:
    report.files.append(raw.name)
    report.rows_read = raw.n_rows + raw.malformed_count
    n = raw.n_rows
    cols = raw.columns
    rej = _Rejections(n, CATALOG_REASON_ORDER)

    item = _encode(cols["item_id"])
    item_empty, item_bad = _id_checks(item)
    rej.mark("missing_field", item_empty, "item_id")
    rej.mark("invalid_item_id", item_bad, "item_id")

    def text_column(name: str, limit: int, reason: str) -> np.ndarray:
        if name not in cols:
            out = np.empty(n, dtype=object)
            out[:] = ""
            return out
        enc = _encode(pc.utf8_trim_whitespace(_as_string(cols[name])))
        too_long = np.array([len(v) > limit for v in enc.values], dtype=bool)
        rej.mark(reason, too_long[enc.codes], name)
        return enc.values[enc.codes]

    title = text_column("title", contract.MAX_TITLE_LENGTH, "invalid_title")
    category = text_column("category", contract.MAX_CATEGORY_LENGTH, "invalid_category")
    price = _price_column(cols, n, rej)
    if "available" in cols:
        available, ok = _parse_bool(cols["available"])
        rej.mark("invalid_available", ~ok, "available")
    else:
        available = np.ones(n, dtype=bool)
    # A repeated item id: the first otherwise valid row wins, later ones are rejected (conflicting data).
    first_seen = np.full(len(item.values), n, dtype=np.int64)
    candidate = ~rej.marked()
    rows = np.flatnonzero(candidate)
    np.minimum.at(first_seen, item.codes[rows], rows)
    repeated = candidate & (first_seen[item.codes] != np.arange(n))
    rej.mark("duplicate_item_id", repeated, "item_id")

    good = rej.finish(report, raw)
    report.rows_loaded = int(good.sum())
    check_bad_fraction(report, max_bad_fraction, "catalog")
    catalog = Catalog(
        item_id=item.values[item.codes[good]],
        title=title[good],
        category=category[good],
        price=price[good],
        available=available[good],
    )
    return catalog, report
