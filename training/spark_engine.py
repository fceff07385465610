"""Train on Apache Spark: the same contract, weighting and artifact as the local engine, distributed.

``recsvc train --engine spark`` (the ``recsvc[spark]`` extra and Java 17) reads events, CSV or
Parquet, at any URI Spark can read (a local path, ``s3a://``, ``hdfs://``; a file or a folder of
part files) and:

1. **validates** every row on the executors with :func:`recsvc.core.eventfiles.validate_event_columns`
   -- the file loader's own checks, reasons and priorities, so the rejection counts are the local
   loader's -- and drops exact duplicates (``dropDuplicates`` over the parsed fields);
2. **weights** events with :mod:`recsvc.core.weighting`: the per-event contribution, the scaling and
   the popularity contribution run on each partition (``mapInArrow``), the sums are Spark
   aggregations, the id orders are the local ones (users sorted, catalog items first);
3. **fits Spark ML's implicit ALS** with the confidences mapped to recsvc's (below);
4. **evaluates** ALS and the two popularity baselines on the local engine's time split;
5. assembles the artifact on the driver -- factors and matrices arrive through Parquet read by
   pyarrow -- mines **bundles** and fits the **repurchase model** there from the purchase lines
   only, and writes it with
   :func:`recsvc.core.artifact.write_artifact`. ``recsvc publish`` and everything after it cannot
   tell the engines apart; ``manifest["training"]["engine"]`` can.

Confidence and regularization
-----------------------------
recsvc's recipe (implicit) gives an entry with confidence ``c`` (before alpha) the weight
``C = alpha * c`` and regularizes every row by the same ``regularization``. Spark ML's implicit ALS
gives a rating ``r > 0`` the weight ``C = 1 + alpha * r`` and regularizes a row with ``n`` entries
by ``regParam * n`` (it cannot be switched off). So Spark gets ``r = c - 1 / alpha`` (same ``C``),
floored at a tiny positive value where ``alpha * c <= 1`` (Spark's ``C`` cannot go below 1), and
``regParam = regularization / (mean entries per user)`` so an average user is regularized as the
local engine would. The manifest records both facts (``params.regularization_scaling = "count"``,
``params.regularization_per_entry``, ``params.confidence_floor = 1``) and real-time fold-in solves a
user's row with exactly that regularization and floor (:meth:`recsvc.core.weighting.RowRecipe.solve_terms`).

What stays on one machine (the driver) is listed in docs/scaling.md: the id lists, the artifact's
matrices, bundle mining and, at publish time, every user's top-K.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsvc.core import contract
from recsvc.core.artifact import library_versions
from recsvc.core.eventfiles import (
    EVENT_REASON_ORDER,
    EXAMPLES_PER_REASON,
    BadInputError,
    LoadReport,
    RejectedRow,
    catalog_from_table,
    check_bad_fraction,
    check_header,
    load_catalog,
    validate_event_columns,
)
from recsvc.core.events import Catalog, EventTable
from recsvc.core.ids import IdMap
from recsvc.core.scoring import PLAIN_ALS
from recsvc.core.weighting import (
    WeightingParams,
    bm25_idf,
    event_contributions,
    index_positions,
    popularity_contributions,
    scale_values,
    to_float32,
)
from training.als import TrainParams, check_factors
from training.evaluation import (
    DEFAULT_MAX_TEST_USERS,
    finish_metrics,
    prepare_matrices,
    rank_lists,
    summarise,
)
from training.metrics import DEFAULT_K
from training.pipeline import TrainResult, base_manifest, bundle_candidates, item_metadata, write_model
from training.repurchase import fit_repurchase
from training.splits import SPAN_QUANTILE, SplitSpec, days_cutoff, span_cutoff

log = logging.getLogger("recsvc.training.spark")

ENGINE = "spark"
EVENT_COLUMNS = contract.EVENT_REQUIRED + contract.EVENT_OPTIONAL
CORRUPT = "_corrupt_record"
INPUT_FORMATS = ("auto", "csv", "parquet")
#: Smallest Spark rating: keeps the entry a positive preference where ``alpha * c <= 1``.
MIN_RATING = 1e-6
#: Spark's implicit weight ``1 + alpha * r`` never goes below this.
CONFIDENCE_FLOOR = 1.0
_CHECKED = (
    "user_id string, item_id string, event tinyint, timestamp bigint, order_id string, quantity float, "
    "price float, rec_id string, reason tinyint, bad_column string, bad_value string, file string"
)
_EVENT_FIELDS = ("user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id")


class SparkUnavailable(RuntimeError):
    """pyspark (the ``spark`` extra) or Java is missing."""


@dataclass(frozen=True)
class SparkOptions:
    """Where and how the Spark engine runs.

    Attributes
    ----------
    master : str, optional
        ``local[1]``, ``local[*]``, ``spark://host:7077``, ``yarn``...; None leaves it to
        ``spark-submit`` (or Spark's default, ``local[*]``).
    conf : tuple of (key, value)
        Extra Spark settings (``spark.driver.memory``, ``spark.hadoop.fs.s3a.*``, ``spark.jars.packages``).
    work_dir : str, optional
        Folder (URI) for intermediate Parquet that both the executors and the driver can reach;
        default a local temporary folder, which only suits a local master.
    python : str, optional
        Python of the executors (``PYSPARK_PYTHON``); default this interpreter for a local master.
    input_format : {"auto", "csv", "parquet"}
        ``auto``: from the URI's suffix (a local folder: from its files).
    als_blocks : int, optional
        ALS user and item blocks; default one per core for a local master, else Spark's 10.
    """

    master: str | None = None
    conf: tuple[tuple[str, str], ...] = ()
    work_dir: str | None = None
    python: str | None = None
    input_format: str = "auto"
    als_blocks: int | None = None

    @property
    def local(self) -> bool:
        return self.master is None or self.master.startswith("local")


def spark_session(options: SparkOptions) -> Any:
    """A SparkSession for training (the one already running, if any).

    Raises
    ------
    SparkUnavailable
        pyspark is not installed.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable(
            "the spark engine needs pyspark: pip install 'recsvc[spark]' (and a Java 17 runtime)"
        ) from None
    python = options.python or (sys.executable if options.local else None)
    if python:
        # Executors import this module and recsvc.core; pyspark reads the variable when it starts them.
        os.environ["PYSPARK_PYTHON"] = python
    builder = SparkSession.builder.appName("recsvc-train")
    if options.master:
        builder = builder.master(options.master)
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        # A malformed CSV row must be seen whole, whichever columns a stage reads.
        "spark.sql.csv.parser.columnPruning.enabled": "false",
    }
    if options.local:
        defaults |= {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"}
    for key, value in {**defaults, **dict(options.conf)}.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - the JVM gateway raises bare exceptions (no Java, ...)
        raise SparkUnavailable(f"cannot start Spark ({type(e).__name__}: {e}); is Java 17 installed?") from e
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _session_running() -> bool:
    """Whether this process already runs a SparkSession (then a run uses it and leaves it running)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return False
    return SparkSession.getActiveSession() is not None


# ------------------------------------------------------------------------------------------------
# Work folder: Parquet between the executors and the driver
# ------------------------------------------------------------------------------------------------


class _WorkDir:
    """A private folder for intermediate Parquet; deleted (on any file system Spark knows) at exit."""

    def __init__(self, spark: Any, base: str | None):
        self.spark = spark
        self._local_tmp = None if base else tempfile.mkdtemp(prefix="recsvc-spark-")
        root = base.rstrip("/") if base else self._local_tmp
        self.root = f"{root}/recsvc-{uuid.uuid4().hex[:12]}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, frame: Any, name: str) -> pa.Table:
        """Write ``frame`` as Parquet under ``name`` and read it back on the driver with pyarrow."""
        path = self.path(name)
        frame.write.mode("overwrite").parquet(path)
        return _read_parquet(path)

    def close(self) -> None:
        try:
            jvm = self.spark.sparkContext._jvm
            hadoop_path = jvm.org.apache.hadoop.fs.Path(self.root)
            hadoop_path.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration()).delete(
                hadoop_path, True
            )
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the job's own outcome
            log.warning("could not delete the work folder %s: %s", self.root, e)
        if self._local_tmp:
            shutil.rmtree(self._local_tmp, ignore_errors=True)


def _read_parquet(uri: str) -> pa.Table:
    """pyarrow reads a folder Spark wrote (``s3a://`` is pyarrow's ``s3://``)."""
    if "://" not in uri or uri.startswith("file:"):
        return pq.read_table(uri.removeprefix("file:"))
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))
    return pq.read_table(path, filesystem=filesystem)


# ------------------------------------------------------------------------------------------------
# Reading and validating
# ------------------------------------------------------------------------------------------------


def _format_of(uri: str, requested: str) -> str:
    if requested != "auto":
        return requested
    name = uri.rstrip("/").lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".gz", ".txt")):
        return "csv"
    local = Path(uri.removeprefix("file:"))
    if "://" not in uri and local.is_dir():
        suffixes = {p.suffix.lower() for p in local.iterdir() if not p.name.startswith((".", "_"))}
        if suffixes and suffixes <= {".parquet", ".pq"}:
            return "parquet"
        if suffixes and suffixes <= {".csv", ".gz"}:
            return "csv"
    raise BadInputError(f"{uri}: cannot tell CSV from Parquet; pass --input-format", file=uri)


def _csv_header(spark: Any, uri: str) -> list[str]:
    rows = spark.read.text(uri).limit(1).collect()
    first = rows[0][0].lstrip("\ufeff") if rows else ""
    if not first.strip():
        raise BadInputError(f"{uri}:1: the file is empty or has no header row", file=uri, line=1)
    return [name.strip() for name in next(csv.reader(io.StringIO(first)))]


def _read_csv(spark: Any, uri: str, header: list[str]) -> Any:
    """Every column as a string, RFC 4180 quoting, and the raw text of rows that do not split into
    the header's columns in ``_corrupt_record`` (the local loader's malformed rows)."""
    from pyspark.sql import types as T

    schema = T.StructType(
        [T.StructField(name, T.StringType()) for name in header] + [T.StructField(CORRUPT, T.StringType())]
    )
    return spark.read.csv(
        uri,
        schema=schema,
        header=True,
        mode="PERMISSIVE",
        columnNameOfCorruptRecord=CORRUPT,
        escape='"',
        enforceSchema=True,  # our (stripped) header names, by position
    )


def _read_events_frame(spark: Any, uri: str, input_format: str, report: LoadReport) -> Any:
    """The raw rows of one URI: its columns (strings for CSV), the CSV corrupt record, the file."""
    from pyspark.sql import functions as F

    fmt = _format_of(uri, input_format)
    try:
        if fmt == "csv":
            header = _csv_header(spark, uri)
            check_header(uri, header, EVENT_COLUMNS, contract.EVENT_REQUIRED, report)
            frame = _read_csv(spark, uri, header)
        else:
            frame = spark.read.parquet(uri)
            header = list(frame.columns)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - Spark's AnalysisException: path not found, unreadable
        raise BadInputError(f"{uri}: cannot read {fmt} ({str(e).splitlines()[0][:200]})", file=uri) from None
    check_header(uri, header, EVENT_COLUMNS, contract.EVENT_REQUIRED, report)
    keep = [c for c in header if c in EVENT_COLUMNS] + ([CORRUPT] if fmt == "csv" else [])
    return frame.select(*keep, F.col("_metadata.file_path").alias("file"))


def _validate_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Executors: the events contract on each Arrow batch (``mapInArrow``), every row kept."""
    for batch in batches:
        names = batch.schema.names
        columns: dict[str, Any] = {name: batch.column(name) for name in names if name in EVENT_COLUMNS}
        malformed = None
        if CORRUPT in names:
            columns[CORRUPT] = batch.column(CORRUPT)
            malformed = ~np.asarray(
                batch.column(CORRUPT).is_null().to_numpy(zero_copy_only=False), dtype=bool
            )
        checked = validate_event_columns(columns, batch.num_rows, malformed)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(checked.user_id, pa.string()),
                pa.array(checked.item_id, pa.string()),
                pa.array(checked.event, pa.int8()),
                pa.array(checked.timestamp, pa.int64()),
                pa.array(checked.order_id, pa.string()),
                pa.array(checked.quantity, pa.float32()),
                pa.array(checked.price, pa.float32()),
                pa.array(checked.rec_id, pa.string()),
                pa.array(checked.reason, pa.int8()),
                pa.array(checked.column, pa.string()),
                pa.array(checked.value, pa.string()),
                batch.column("file"),
            ],
            names=[*_EVENT_FIELDS, "reason", "bad_column", "bad_value", "file"],
        )


@dataclass
class SparkEvents:
    """Validated events in Spark (deduplicated, persisted) and what loading found."""

    frame: Any  # DataFrame: user_id, item_id, event, timestamp, order_id, quantity, price, rec_id
    report: LoadReport
    fingerprint: str
    oldest: int
    newest: int


def load_events(
    spark: Any, uris: Sequence[str], *, max_bad_fraction: float = 0.01, input_format: str = "auto"
) -> SparkEvents:
    """Read and validate events files with Spark, as :func:`recsvc.core.eventfiles.load_events` does.

    The load report has the local loader's counts (rows read, loaded, rejected by reason,
    duplicates dropped) and up to five examples per reason naming the file and column (Spark does
    not know line numbers; the local loader run on the same file does).

    Raises
    ------
    BadInputError
        A URI is unreadable or lacks a required column, no row is valid, or more than
        ``max_bad_fraction`` of the rows are bad.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not uris:
        raise BadInputError("no events file given")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    report = LoadReport(files=list(uris))
    frames = [_read_events_frame(spark, uri, input_format, report) for uri in uris]
    checked = functools.reduce(
        lambda a, b: a.unionByName(b), [f.mapInArrow(_validate_batches, _CHECKED) for f in frames]
    ).persist(StorageLevel.MEMORY_AND_DISK)
    # One pass: rows per reason, and an order-free content hash (the data fingerprint).
    row_hash = F.xxhash64(*_EVENT_FIELDS, "bad_value")
    summary = (
        checked.groupBy("reason")
        .agg(
            F.count("*").alias("rows"),
            F.bit_xor(row_hash).alias("xor"),
            F.sum(F.col("timestamp") % 1_000_003).alias("stamps"),
            F.min(F.when(F.col("reason") == 0, F.col("timestamp"))).alias("oldest"),
            F.max(F.when(F.col("reason") == 0, F.col("timestamp"))).alias("newest"),
        )
        .collect()
    )
    by_reason = {int(row["reason"]): row for row in summary}
    report.rows_read = sum(int(row["rows"]) for row in summary)
    if report.rows_read == 0:
        checked.unpersist()
        raise BadInputError(f"{', '.join(uris)}: no event rows after the header", file=uris[0], line=2)
    for code in sorted(c for c in by_reason if c > 0):
        reason = EVENT_REASON_ORDER[code - 1]
        examples = [
            RejectedRow(
                row["file"],
                None,
                None if reason == "malformed_row" else row["bad_column"],
                reason,
                row["bad_value"],
            )
            for row in checked.where(F.col("reason") == code)
            .select("file", "bad_column", "bad_value")
            .limit(EXAMPLES_PER_REASON)
            .collect()
        ]
        report._reject(reason, int(by_reason[code]["rows"]), examples)
    good = int(by_reason[0]["rows"]) if 0 in by_reason else 0
    events = checked.where(F.col("reason") == 0).select(*_EVENT_FIELDS).dropDuplicates()
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    report.rows_loaded = events.count() if good else 0
    report.duplicates_dropped = good - report.rows_loaded
    checked.unpersist()
    check_bad_fraction(report, max_bad_fraction, "event")
    digest = hashlib.sha256()
    for code in sorted(by_reason):
        row = by_reason[code]
        digest.update(f"{code}:{row['rows']}:{row['xor']}:{row['stamps']};".encode())
    return SparkEvents(
        frame=events,
        report=report,
        fingerprint=digest.hexdigest(),
        oldest=int(by_reason[0]["oldest"]),
        newest=int(by_reason[0]["newest"]),
    )


def load_catalog_uri(
    spark: Any, uri: str, *, max_bad_fraction: float = 0.01, input_format: str = "auto"
) -> tuple[Catalog, LoadReport]:
    """The catalog, validated by the local rules (a local file: the local loader, with line numbers).

    The catalog is small next to the events (one row per item), so Spark only reads a remote one
    and hands it to the driver, whose rules are :func:`recsvc.core.eventfiles.catalog_from_table`.
    """
    if "://" not in uri or uri.startswith("file:"):
        return load_catalog(uri.removeprefix("file:"), max_bad_fraction=max_bad_fraction)
    if _format_of(uri, input_format) == "parquet":
        return catalog_from_table(spark.read.parquet(uri).toArrow(), uri, max_bad_fraction=max_bad_fraction)
    table = _read_csv(spark, uri, _csv_header(spark, uri)).toArrow()
    corrupt = table.column(CORRUPT)
    bad = ~np.asarray(corrupt.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    malformed = [str(v) for v in np.asarray(corrupt.to_pylist(), dtype=object)[bad]]
    table = table.filter(pa.array(~bad)).drop_columns([CORRUPT])
    return catalog_from_table(table, uri, malformed=malformed, max_bad_fraction=max_bad_fraction)


# ------------------------------------------------------------------------------------------------
# Weighting
# ------------------------------------------------------------------------------------------------


def _contributions(
    batches: Iterator[pa.RecordBatch], params: WeightingParams, now: int
) -> Iterator[pa.RecordBatch]:
    """Executors: ``w_e`` of each event (:func:`recsvc.core.weighting.event_contributions`)."""
    for batch in batches:
        event = batch.column("event").to_numpy(zero_copy_only=False)
        stamps = batch.column("timestamp").to_numpy(zero_copy_only=False)
        weight = event_contributions(event, stamps, params, now)
        yield pa.RecordBatch.from_arrays(
            [batch.column("u"), batch.column("i"), pa.array(weight, pa.float64())], names=["u", "i", "w"]
        )


def _scaled(
    batches: Iterator[pa.RecordBatch], params: WeightingParams, avg_length: float | None
) -> Iterator[pa.RecordBatch]:
    """Executors: the scaling step (:func:`recsvc.core.weighting.scale_values`) of each entry."""
    for batch in batches:
        raw = batch.column("raw").to_numpy(zero_copy_only=False)
        if params.scaling == "bm25":
            values = scale_values(
                raw,
                params,
                row_lengths=batch.column("length").to_numpy(zero_copy_only=False),
                idf=batch.column("idf").to_numpy(zero_copy_only=False),
                avg_length=avg_length,
            )
        else:
            values = scale_values(raw, params)
        yield pa.RecordBatch.from_arrays(
            [batch.column("u"), batch.column("i"), pa.array(values, pa.float64())], names=["u", "i", "c"]
        )


def _popularity(
    batches: Iterator[pa.RecordBatch], params: WeightingParams, now: int, half_life_days: float
) -> Iterator[pa.RecordBatch]:
    """Executors: what each event adds to its item's popularity (:func:`popularity_contributions`)."""
    for batch in batches:
        event = batch.column("event").to_numpy(zero_copy_only=False)
        stamps = batch.column("timestamp").to_numpy(zero_copy_only=False)
        value = popularity_contributions(event, stamps, params, now, half_life_days)
        yield pa.RecordBatch.from_arrays([batch.column("i"), pa.array(value, pa.float64())], names=["i", "p"])


@dataclass
class SparkMatrix:
    """The confidence matrix in Spark, with the id orders of the local engine."""

    user_ids: np.ndarray  # object, row order
    item_ids: np.ndarray  # object, column order
    users: Any  # DataFrame user_id, u
    items: Any  # DataFrame item_id, i
    entries: Any  # DataFrame u, i, c (scaled confidence before alpha, float64), persisted
    extra_params: dict[str, Any]

    def confidence(self, work: _WorkDir, name: str) -> sp.csr_matrix:
        """Collected on the driver: float32 CSR, as :func:`recsvc.core.weighting.confidence_matrix`."""
        table = work.write(self.entries, name)
        rows = table.column("u").to_numpy()
        cols = table.column("i").to_numpy()
        values = table.column("c").to_numpy()
        matrix = sp.csr_matrix((values, (rows, cols)), shape=(len(self.user_ids), len(self.item_ids)))
        return to_float32(matrix)


def _item_order(spark: Any, events: Any, catalog_item_ids: np.ndarray | None) -> np.ndarray:
    """Catalog items in catalog order, then items seen only in events, sorted (the local order)."""
    seen = events.select("item_id").distinct().toArrow().column("item_id").to_numpy(zero_copy_only=False)
    seen = np.sort(np.asarray(seen, dtype=object))
    if catalog_item_ids is None or len(catalog_item_ids) == 0:
        return seen
    catalog_ids = np.asarray(catalog_item_ids, dtype=object)
    extra = seen[index_positions(seen, catalog_ids) < 0]
    return np.concatenate([catalog_ids, extra])


def weighted_matrix(
    spark: Any,
    events: Any,
    params: WeightingParams,
    catalog_item_ids: np.ndarray | None,
    now: int,
    work: _WorkDir,
    name: str = "matrix",
) -> SparkMatrix:
    """The confidence matrix of ``events`` (a DataFrame of validated events), computed by Spark.

    Equal to the local :func:`recsvc.core.weighting.id_maps` + :func:`confidence_matrix` up to the
    order in which float64 sums are added.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    table = params.weight_table()
    positive = [int(code) for code in np.flatnonzero(table > 0)]
    # Users: those with an event of positive weight, sorted as the local engine sorts them. The
    # driver needs the list for the artifact anyway, so it sorts it and hands Spark the index.
    seen = events.where(F.col("event").isin(positive)).select("user_id").distinct().toArrow()
    user_ids = np.sort(np.asarray(seen.column("user_id").to_numpy(zero_copy_only=False), dtype=object))
    users = spark.createDataFrame(
        pa.table(
            {"user_id": pa.array(user_ids, pa.string()), "u": pa.array(np.arange(len(user_ids)), pa.int32())}
        )
    )
    item_ids = _item_order(spark, events, catalog_item_ids)
    items = spark.createDataFrame(
        pa.table(
            {"item_id": pa.array(item_ids, pa.string()), "i": pa.array(np.arange(len(item_ids)), pa.int32())}
        )
    )
    rows = (
        events.join(users, "user_id")
        .join(F.broadcast(items), "item_id")
        .select("u", "i", "event", "timestamp")
    )
    contributions = rows.mapInArrow(
        functools.partial(_contributions, params=params, now=now), "u int, i int, w double"
    )
    raw = (
        contributions.where(F.col("w") > 0)
        .groupBy("u", "i")
        .agg(F.sum("w").alias("raw"))
        .where((F.col("raw") > 0) & (F.col("raw") < float("inf")))
    )
    extra: dict[str, Any] = {}
    avg_length = None
    if params.scaling == "bm25":
        raw = raw.persist(StorageLevel.MEMORY_AND_DISK)
        lengths = raw.groupBy("u").agg(F.sum("raw").alias("length"))
        total = lengths.agg(F.sum("length")).collect()[0][0] or 0.0
        avg_length = float(total) / len(user_ids) if len(user_ids) else 1.0
        avg_length = avg_length if avg_length > 0 else 1.0
        frequency = np.zeros(len(item_ids), dtype=np.int64)
        for row in raw.groupBy("i").count().collect():
            frequency[int(row["i"])] = int(row["count"])
        idf = bm25_idf(frequency, len(user_ids))
        idf_frame = spark.createDataFrame(
            pa.table(
                {"i": pa.array(np.arange(len(item_ids)), pa.int32()), "idf": pa.array(idf, pa.float64())}
            )
        )
        raw = raw.join(lengths, "u").join(F.broadcast(idf_frame), "i")
        extra = {"bm25_n_users": len(user_ids), "bm25_avg_length": avg_length}
    entries = raw.select(
        *(["u", "i", "raw", "length", "idf"] if params.scaling == "bm25" else ["u", "i", "raw"])
    )
    scaled = entries.mapInArrow(
        functools.partial(_scaled, params=params, avg_length=avg_length), "u int, i int, c double"
    ).persist(StorageLevel.MEMORY_AND_DISK)
    return SparkMatrix(user_ids, item_ids, users, items, scaled, extra)


def purchase_matrix(matrix: SparkMatrix, events: Any, work: _WorkDir, name: str) -> sp.csr_matrix:
    """Purchase events per (user, item) as float32 CSR (:func:`recsvc.core.weighting.purchase_counts`)."""
    from pyspark.sql import functions as F

    counts = (
        events.where(F.col("event") == contract.PURCHASE)
        .join(matrix.users, "user_id")
        .join(F.broadcast(matrix.items), "item_id")
        .groupBy("u", "i")
        .agg(F.count("*").cast("float").alias("n"))
    )
    table = work.write(counts, name)
    return sp.csr_matrix(
        (table.column("n").to_numpy(), (table.column("u").to_numpy(), table.column("i").to_numpy())),
        shape=(len(matrix.user_ids), len(matrix.item_ids)),
        dtype=np.float32,
    )


def popularity_vector(
    matrix: SparkMatrix, events: Any, params: WeightingParams, now: int, half_life_days: float = 14.0
) -> np.ndarray:
    """Per-item popularity (:func:`recsvc.core.weighting.popularity_scores`) summed by Spark."""
    from pyspark.sql import functions as F

    rows = events.join(F.broadcast(matrix.items), "item_id").select("i", "event", "timestamp")
    sums = (
        rows.mapInArrow(
            functools.partial(_popularity, params=params, now=now, half_life_days=half_life_days),
            "i int, p double",
        )
        .groupBy("i")
        .agg(F.sum("p").alias("p"))
        .toArrow()
    )
    out = np.zeros(len(matrix.item_ids), dtype=np.float64)
    out[sums.column("i").to_numpy()] = sums.column("p").to_numpy()
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# ALS
# ------------------------------------------------------------------------------------------------


def _factor_matrix(table: pa.Table, rows: int, factors: int) -> np.ndarray:
    """Spark's ``(id, features)`` rows placed by id; ids Spark never saw keep zero rows."""
    out = np.zeros((rows, factors), dtype=np.float32)
    if table.num_rows:
        ids = table.column("id").to_numpy()
        flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out[ids] = np.asarray(flat, dtype=np.float32).reshape(len(ids), factors)
    return out


def fit_spark_als(
    matrix: SparkMatrix,
    params: TrainParams,
    *,
    seed: int,
    work: _WorkDir,
    blocks: int | None = None,
    name: str = "als",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit Spark ML's implicit ALS on the matrix; ``(user_factors, item_factors, what it did)``.

    See the module docstring for the confidence and regularization mapping.

    Raises
    ------
    ValueError
        The matrix has no entry.
    FitError
        The factors are not finite or have the wrong shape.
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    alpha = float(params.alpha)
    stats = matrix.entries.agg(
        F.count("*").alias("entries"),
        F.sum(F.when(F.col("c").cast("float") * alpha <= CONFIDENCE_FLOOR, 1).otherwise(0)).alias("floored"),
    ).collect()[0]
    entries = int(stats["entries"])
    if entries == 0:
        raise ValueError("confidence matrix has no entries: no weighted events to train on")
    n_users, n_items = len(matrix.user_ids), len(matrix.item_ids)
    per_entry = params.effective_regularization(len(matrix.item_ids)) * n_users / entries
    ratings = matrix.entries.select(
        "u",
        "i",
        F.greatest(F.col("c").cast("float") - F.lit(1.0 / alpha), F.lit(MIN_RATING)).cast("float").alias("r"),
    )
    spark = matrix.entries.sparkSession
    spark.sparkContext.setCheckpointDir(work.path(f"{name}-checkpoints"))
    options: dict[str, Any] = dict(
        rank=params.factors,
        maxIter=params.iterations,
        regParam=per_entry,
        alpha=alpha,
        implicitPrefs=True,
        nonnegative=False,
        userCol="u",
        itemCol="i",
        ratingCol="r",
        seed=int(seed),
    )
    if not blocks and spark.sparkContext.master.startswith("local"):
        blocks = spark.sparkContext.defaultParallelism  # one block per core, not Spark's 10
    if blocks:
        options |= {"numUserBlocks": int(blocks), "numItemBlocks": int(blocks)}
    started = time.perf_counter()
    model = ALS(**options).fit(ratings)
    fit_s = time.perf_counter() - started
    user_factors = _factor_matrix(work.write(model.userFactors, f"{name}-users"), n_users, params.factors)
    item_factors = _factor_matrix(work.write(model.itemFactors, f"{name}-items"), n_items, params.factors)
    check_factors(user_factors, item_factors, n_users, n_items, params.factors)
    info = {
        "regularization_per_entry": per_entry,
        "mean_entries_per_user": entries / n_users,
        "entries": entries,
        "entries_at_confidence_floor": int(stats["floored"]),
        "rating": "c - 1/alpha (Spark weighs 1 + alpha * rating), at least 1e-6",
        "blocks": blocks,
        "fit_seconds": round(fit_s, 3),
    }
    return user_factors, item_factors, info


# ------------------------------------------------------------------------------------------------
# Evaluation and the whole run
# ------------------------------------------------------------------------------------------------


def evaluate_split(
    spark: Any,
    events: SparkEvents,
    catalog_item_ids: np.ndarray | None,
    params: TrainParams,
    *,
    split: str | None,
    seed: int,
    work: _WorkDir,
    blocks: int | None = None,
    ks: Sequence[int] = DEFAULT_K,
    max_test_users: int | None = DEFAULT_MAX_TEST_USERS,
) -> dict[str, Any]:
    """The Spark ALS and the popularity baselines on the local engine's global time split.

    The cutoff follows :mod:`training.splits` (the robust span's last 10 %, or ``days:N``); the
    matrices are collected on the driver and scored by :mod:`training.evaluation`, so the metrics,
    intervals and warnings are the local engine's. The per-user split needs every user's history
    in order and is the local engine's (``recsvc evaluate``).

    Raises
    ------
    ValueError
        The split leaves no training events, or names a protocol Spark does not run.
    """
    from pyspark.sql import functions as F

    spec = SplitSpec.parse(split)
    if spec.protocol == "user":
        raise ValueError(
            "--engine spark evaluates the global split (or days:N); run recsvc evaluate for user"
        )
    frame = events.frame
    if spec.protocol == "days":
        assert spec.days is not None  # parse() requires it
        cutoff = days_cutoff(events.newest, spec.days)
    else:
        # Exact and interpolated as numpy's quantile, so both engines cut at the same second.
        rows = frame.count()
        if rows > 100:
            start = frame.agg(F.percentile("timestamp", F.lit(SPAN_QUANTILE))).first()[0]
        else:
            start = events.oldest
        cutoff = span_cutoff(float(start), events.newest, spec.fraction or 0.1)
    train = frame.where(F.col("timestamp") < cutoff)
    n_train = train.count()
    if n_train == 0:
        raise ValueError("the split leaves no training events: use a shorter window")
    test = (
        frame.where((F.col("timestamp") >= cutoff) & (F.col("event") == contract.PURCHASE))
        .select("user_id", "item_id")
        .toArrow()
    )
    weighting = params.weighting()
    matrix = weighted_matrix(spark, train, weighting, catalog_item_ids, cutoff - 1, work, "eval")
    confidence = matrix.confidence(work, "eval-confidence")
    rule = {"exclude": "interacted" if params.model.exclude == "interacted" else "purchased", "given": True}
    info = {"protocol": spec.protocol, "cutoff": int(cutoff), "train_events": int(n_train)}
    prep = prepare_matrices(
        info,
        matrix.user_ids,
        matrix.item_ids,
        purchase_matrix(matrix, train, work, "eval-purchases"),
        confidence,
        _events_per_user(train, matrix.user_ids, work),
        (
            np.asarray(test.column("user_id").to_numpy(zero_copy_only=False), dtype=object),
            np.asarray(test.column("item_id").to_numpy(zero_copy_only=False), dtype=object),
        ),
        rule,
        max_test_users=max_test_users,
        seed=seed,
    )
    ks = tuple(sorted({int(k) for k in ks}))
    metrics: dict[str, Any] = {"split": {**prep.info, "k": list(ks)}}
    if len(prep.test_rows) == 0:
        metrics["note"] = "no test user: nobody known before the cutoff purchased a new item after it"
        metrics["warnings"] = [metrics["note"]]
        matrix.entries.unpersist()
        return metrics
    depth = max(ks)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    user_factors, item_factors, _ = fit_spark_als(
        matrix, params, seed=seed, work=work, blocks=blocks, name="eval-als"
    )
    metrics["model"] = summarise(
        prep, rank_lists(prep, lambda rows: user_factors[rows] @ item_factors.T, depth), ks, seed
    )
    timings["model"] = round(time.perf_counter() - started, 3)
    n_items = len(prep.item_ids)
    metrics["popularity"] = summarise(
        prep, rank_lists(prep, lambda rows: np.zeros((len(rows), n_items)), depth), ks, seed
    )
    recent = popularity_vector(matrix, train, weighting, cutoff - 1).astype(np.float64)
    metrics["recent_popularity"] = summarise(
        prep, rank_lists(prep, lambda rows: np.broadcast_to(recent, (len(rows), n_items)), depth), ks, seed
    )
    metrics["split"]["seconds"] = timings
    metrics["split"]["not_run"] = (
        "item_knn, implicit_als and bundle evaluation (local engine: recsvc evaluate)"
    )
    matrix.entries.unpersist()
    return finish_metrics(metrics, prep, ks, seed, [])


def _events_per_user(frame: Any, user_ids: np.ndarray, work: _WorkDir) -> np.ndarray:
    """Events of each user of ``user_ids`` in ``frame`` (the activity buckets of the evaluation)."""
    counts = work.write(frame.groupBy("user_id").count(), "eval-activity")
    ids = np.asarray(counts.column("user_id").to_numpy(zero_copy_only=False), dtype=object)
    positions = IdMap(user_ids).positions(ids)
    out = np.zeros(len(user_ids), dtype=np.int64)
    known = positions >= 0
    out[positions[known]] = counts.column("count").to_numpy()[known]
    return out


def _purchase_lines(events: Any, work: _WorkDir) -> EventTable:
    """Every purchase event on the driver (the input of bundle mining), in a deterministic order."""
    from pyspark.sql import functions as F

    lines = events.where(F.col("event") == contract.PURCHASE).select(
        "user_id", "item_id", "event", "timestamp", "order_id"
    )
    table = work.write(lines, "purchases-lines").sort_by(
        [
            ("timestamp", "ascending"),
            ("user_id", "ascending"),
            ("order_id", "ascending"),
            ("item_id", "ascending"),
        ]
    )

    def column(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False))

    return EventTable(
        user_id=column("user_id"),
        item_id=column("item_id"),
        event=column("event"),
        timestamp=column("timestamp"),
        order_id=column("order_id"),
    )


def train_model_spark(
    event_uris: str | Iterable[str],
    catalog_uri: str | None = None,
    *,
    models_dir: str | os.PathLike = "models",
    params: TrainParams | None = None,
    evaluate: bool = True,
    max_bad_fraction: float = 0.01,
    seed: int = 42,
    split: str | None = None,
    threads: int = 0,
    options: SparkOptions | None = None,
    spark: Any = None,
    version: str | None = None,
    echo: Any = None,
) -> TrainResult:
    """Train with Spark and write ``<models_dir>/<version>/``, the artifact the local engine writes.

    Parameters
    ----------
    event_uris : str or iterable of str
        Events files or folders (CSV or Parquet), any URI Spark reads.
    catalog_uri : str, optional
        Catalog file (a local path is read by the local loader).
    models_dir, params, max_bad_fraction, seed, split, version, echo
        As for :func:`training.pipeline.train_model` (Spark evaluates the global split only).
        Spark fits the blend's ALS core: its models serve plain ALS (``manifest["model"]``).
    evaluate : bool, default True
        Evaluate ALS and the popularity baselines on a time split first (a second Spark fit).
    threads : int
        Bundle mining threads on the driver (0 = one per core).
    options : SparkOptions, optional
        Where Spark runs (ignored when ``spark`` is given).
    spark : SparkSession, optional
        A running session to use (it is left running); default: the process's running session, else
        one started from ``options`` and stopped at the end.

    Raises
    ------
    BadInputError
        Bad input; nothing is written.
    ValueError
        Bad parameters, or nothing to train on.
    SparkUnavailable
        pyspark or Java is missing.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    say = echo or (lambda line: log.info(line))
    # The ALS core of the blend (item-kNN and the popularity prior are the local engine's).
    params = (params or TrainParams()).replace(model=PLAIN_ALS)
    options = options or SparkOptions()
    uris = [event_uris] if isinstance(event_uris, str) else [str(u) for u in event_uris]
    own_session = spark is None and not _session_running()
    spark = spark or spark_session(options)
    work = _WorkDir(spark, options.work_dir)
    try:
        t0 = time.perf_counter()
        events = load_events(
            spark, uris, max_bad_fraction=max_bad_fraction, input_format=options.input_format
        )
        catalog, catalog_report = (None, None)
        if catalog_uri is not None:
            catalog, catalog_report = load_catalog_uri(
                spark, catalog_uri, max_bad_fraction=max_bad_fraction, input_format=options.input_format
            )
        timings["load"] = time.perf_counter() - t0
        say(events.report.format())
        if catalog_report is not None:
            say("catalog: " + catalog_report.format())
        catalog_ids = None if catalog is None else catalog.item_id

        metrics: dict[str, Any] = {}
        if evaluate:
            t0 = time.perf_counter()
            try:
                metrics = evaluate_split(
                    spark, events, catalog_ids, params, split=split, seed=seed, work=work,
                    blocks=options.als_blocks,
                )  # fmt: skip
            except ValueError as e:
                metrics = {"note": f"not evaluated: {e}"}
                say(f"warning: {metrics['note']}")
            timings["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        weighting = params.weighting()
        trained_until = events.newest
        matrix = weighted_matrix(spark, events.frame, weighting, catalog_ids, trained_until, work)
        if len(matrix.user_ids) == 0:
            raise ValueError("no user has an event with a positive weight: nothing to train on")
        confidence = matrix.confidence(work, "confidence")
        timings["matrix"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        user_factors, item_factors, als_info = fit_spark_als(
            matrix, params, seed=seed, work=work, blocks=options.als_blocks
        )
        timings["fit"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        meta = item_metadata(matrix.item_ids, catalog)
        popularity = popularity_vector(matrix, events.frame, weighting, trained_until)
        purchases = purchase_matrix(matrix, events.frame, work, "purchases")
        timings["extras"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lines = _purchase_lines(events.frame, work)
        bundles, bundle_report = bundle_candidates(
            lines, matrix.item_ids, item_factors, meta["category"], threads
        )
        timings["bundles"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        repurchase, repurchase_report = fit_repurchase(
            lines, matrix.user_ids, matrix.item_ids, meta["category"], trained_until
        )
        timings["repurchase"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = events.report
        manifest = base_manifest(
            fingerprint=events.fingerprint,
            params=params.resolved(len(matrix.item_ids)).to_manifest(seed)
            | matrix.extra_params
            | {
                "regularization_scaling": "count",
                "regularization_per_entry": als_info["regularization_per_entry"],
                "confidence_floor": CONFIDENCE_FLOOR,
            },
            trained_until=trained_until,
            metrics=metrics,
            report=report,
            catalog=catalog,
            catalog_report=catalog_report,
            inputs={"events": uris, "catalog": catalog_uri},
            training={
                "engine": ENGINE,
                "spark": {
                    "version": spark.version,
                    "master": spark.sparkContext.master,
                    "default_parallelism": spark.sparkContext.defaultParallelism,
                    "als": als_info,
                    "fingerprint": "sha256 of rows, XOR of xxhash64 and timestamps per rejection reason",
                },
                "threads": int(threads),
                "device": "cpu",
                "bundles": bundle_report | {"where": "driver, from the purchase lines"},
                "repurchase": repurchase_report | {"where": "driver, from the purchase lines"},
            },
            n_items=len(matrix.item_ids),
        )
        manifest["counts"]["purchase_lines"] = len(lines)
        manifest["model"] = params.model.to_dict()  # plain ALS: no item-kNN or prior to serve
        manifest["library_versions"] = library_versions() | {"pyspark": spark.version}
        path, artifact = write_model(
            manifest,
            user_ids=matrix.user_ids,
            item_ids=matrix.item_ids,
            user_factors=user_factors,
            item_factors=item_factors,
            meta=meta,
            popularity=popularity,
            confidence=confidence,
            purchases=purchases,
            bundles=bundles,
            models_dir=models_dir,
            version=version,
            timings=timings,
            repurchase=repurchase,
        )
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        say(f"wrote {path} in {timings['total']:.1f}s (spark fit {timings['fit']:.1f}s)")
        matrix.entries.unpersist()
        events.frame.unpersist()
        return TrainResult(
            path=path,
            manifest=artifact.manifest,
            report=report,
            metrics=metrics,
            catalog_report=catalog_report,
        )
    finally:
        work.close()
        if own_session:
            spark.stop()
