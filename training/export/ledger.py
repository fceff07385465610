"""The export ledger: what was sent to whom, for the frequency cap, under an exclusive file lock."""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsvc.core import tempfiles
from recsvc.core.errors import Locked
from training.export.files import fsync_dir, fsync_path

MAX_CAP_LAST = 50


LEDGER_KEEP = 50  # ledger records kept; bounds --cap-last


class ExportLedger:
    """Durable record of what every export sent, for frequency capping across runs.

    One Parquet file per export under ``<var_dir>/exports/ledger/<export_id>.parquet`` with the
    columns ``user_id, item_id`` and the export's metadata in the schema. Files: a batch job's
    record belongs next to the files it wrote, needs no server, survives a Redis flush, and a
    dictionary-encoded Parquet of 1.6M pairs is a few MB (in the serving Redis it would cost
    ~100 MB of the memory the storefront needs). Writes are temp + fsync + rename.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / "ledger"

    def records(self) -> list[Path]:
        """Committed records, oldest first (export ids sort by time)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.parquet") if not p.name.startswith("."))

    def recent(self, count: int) -> list[Path]:
        return self.records()[-count:] if count > 0 else []

    def sent_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(user_ids, item_ids)`` sent by the last ``count`` exports (object arrays)."""
        import pyarrow.parquet as pq

        users, items = [], []
        for path in self.recent(count):
            table = pq.read_table(path, columns=["user_id", "item_id"])
            users.append(table.column("user_id").combine_chunks().cast(pa.string()))
            items.append(table.column("item_id").combine_chunks().cast(pa.string()))
        if not users:
            return np.zeros(0, dtype=object), np.zeros(0, dtype=object)
        return (
            pa.concat_arrays(users).to_numpy(zero_copy_only=False),
            pa.concat_arrays(items).to_numpy(zero_copy_only=False),
        )

    def metadata(self, path: Path) -> dict[str, Any]:
        import pyarrow.parquet as pq

        raw = pq.ParquetFile(path).metadata.metadata or {}
        return json.loads(raw.get(b"recsvc_export", b"{}"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the exclusive export lock; raise :class:`ExportLocked` if another export holds it.

        A cap is only a cap if two exports never read the ledger at the same time. ``flock`` is
        released by the kernel when the process dies, so a killed export never leaves it stuck.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ExportLocked(
                    f"another export is running ({holder}); lock {self.root / '.lock'}"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {now_iso()}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def writer(self, export_id: str) -> LedgerWriter:
        return LedgerWriter(self, export_id)

    def prune(self, keep: int = LEDGER_KEEP) -> list[str]:
        doomed = self.records()[:-keep] if keep > 0 else self.records()
        for path in doomed:
            path.unlink(missing_ok=True)
        return [p.stem for p in doomed]


class LedgerWriter:
    """Streams one export's ``(user_id, item_id)`` pairs to a temp file; :meth:`commit` publishes."""

    SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string())])

    def __init__(self, ledger: ExportLedger, export_id: str):
        import pyarrow.parquet as pq

        ledger.dir.mkdir(parents=True, exist_ok=True)
        self.final = ledger.dir / f"{export_id}.parquet"
        tempfiles.sweep(ledger.dir.glob(".*.parquet.part"))  # leftovers of ledgers whose export died
        self.tmp = ledger.dir / f".{export_id}.parquet.part"
        self._writer = pq.ParquetWriter(self.tmp, self.SCHEMA, compression="zstd", use_dictionary=True)
        self._lock: int | None = tempfiles.hold(self.tmp)
        self._closed = False

    def write(self, user_ids: pa.Array, item_ids: pa.Array) -> None:
        self._writer.write_table(pa.table([user_ids, item_ids], schema=self.SCHEMA))

    def close(self, metadata: dict[str, Any]) -> None:
        # Metadata is known only at the end; Parquet keeps it in the footer, written on close.
        self._writer.add_key_value_metadata({"recsvc_export": json.dumps(metadata)})
        self._writer.close()
        self._closed = True
        fsync_path(self.tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        tempfiles.release(self._lock)
        tempfiles.sweep(self.final.parent.glob(".*.parquet.part"))

    def abort(self) -> None:
        if not self._closed:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - already failing; the temp file is removed below
                pass
        self.tmp.unlink(missing_ok=True)
        tempfiles.release(self._lock)


class ExportLocked(Locked):
    """Another export holds the ledger lock."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
