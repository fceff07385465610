"""Batch top-N for every known user of a model (``recsvc recommend``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from recsvc.core.progress import Progress
from recsvc.core.ranking import mask_positions
from recsvc.core.topk import SCORE_CHUNK_ELEMENTS


def write_recommendations(
    artifact: Any,
    out: Path,
    *,
    n: int = 20,
    include_purchased: bool = False,
    include_unavailable: bool = False,
    threads: int = 0,
    batch_size: int = 10_000,
    show_progress: bool = False,
) -> int:
    """Top-``n`` per user, ranked by the model's scorer as publishing ranks; returns rows written.

    Parameters
    ----------
    artifact : recsvc.core.artifact.Artifact
        A loaded model.
    out : Path
        CSV file to write (``user_id,rank,item_id,title,category,price,score``; rank starts at 1;
        title, category and price are the model's catalogue's, empty when unknown).
    n : int
        Items per user (fewer when filters leave fewer).
    include_purchased : bool
        Keep items the user may not be shown again (purchases, or every item they interacted with
        when the model's exclusion rule says so); excluded by default.
    include_unavailable : bool
        Keep out-of-stock items (excluded by default).
    threads : int
        BLAS threads for the scoring products (0: numpy's default).
    batch_size, show_progress
        Most users scored per block (bounded so a block holds at most ``SCORE_CHUNK_ELEMENTS``
        scores), progress (:mod:`recsvc.core.progress`).
    """
    if threads > 0:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads, "blas"):
            return write_recommendations(
                artifact,
                out,
                n=n,
                include_purchased=include_purchased,
                include_unavailable=include_unavailable,
                batch_size=batch_size,
                show_progress=show_progress,
            )
    scorer = artifact.scorer()
    raw = artifact.raw_interactions()
    never = (artifact.interactions if scorer.spec.excludes_interacted else artifact.purchases).tocsr()
    user_ids = np.asarray(artifact.user_ids, dtype=object)
    item_ids = np.asarray(artifact.item_ids, dtype=object)
    unavailable = np.flatnonzero(~artifact.available) if not include_unavailable else np.zeros(0, np.int64)
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("rank", pa.int32()),
            ("item_id", pa.string()),
            ("title", pa.string()),
            ("category", pa.string()),
            ("price", pa.float32()),
            ("score", pa.float32()),
        ]
    )
    titles = pa.array(list(artifact.titles), pa.string())
    categories = pa.array(
        [artifact.categories[c] if c >= 0 else None for c in np.asarray(artifact.category).tolist()],
        pa.string(),
    )
    prices = pa.array(np.asarray(artifact.price, dtype=np.float32), pa.float32(), from_pandas=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written = 0
    n_users = artifact.n_users
    batch_size = max(1, min(batch_size, SCORE_CHUNK_ELEMENTS // max(1, artifact.n_items)))
    try:
        with (
            Progress("recommend", total=n_users, unit="users", enabled=show_progress) as bar,
            pa_csv.CSVWriter(tmp, schema) as writer,
        ):
            for lo in range(0, n_users, batch_size):
                users = np.arange(lo, min(lo + batch_size, n_users))
                blocked = None if include_purchased else never[users]
                ids, scores = scorer.top_k(raw[users], artifact.user_factors[users], n, blocked, unavailable)
                rows, cols = mask_positions(ids >= 0)
                picked = pa.array(ids[rows, cols])
                writer.write_table(
                    pa.table(
                        {
                            "user_id": pa.array(user_ids[users[rows]], pa.string()),
                            "rank": pa.array(cols + 1, pa.int32()),
                            "item_id": pa.array(item_ids[ids[rows, cols]], pa.string()),
                            "title": titles.take(picked),
                            "category": categories.take(picked),
                            "price": prices.take(picked),
                            "score": pa.array(scores[rows, cols], pa.float32()),
                        },
                        schema=schema,
                    )
                )
                written += len(rows)
                bar.update(len(users))
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written
