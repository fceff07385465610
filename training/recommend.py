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
from training.als import recommender_from_factors


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
    """Top-``n`` per user with implicit's batched ``recommend``; returns the number of rows written.

    Parameters
    ----------
    artifact : recsvc.core.artifact.Artifact
        A loaded model.
    out : Path
        CSV file to write (``user_id,rank,item_id,score``; rank starts at 1).
    n : int
        Items per user (fewer when filters leave fewer).
    include_purchased : bool
        Keep items the user purchased (excluded by default).
    include_unavailable : bool
        Keep out-of-stock items (excluded by default).
    threads, batch_size, show_progress
        implicit threads, users per recommend call, progress (:mod:`recsvc.core.progress`).
    """
    model = recommender_from_factors(artifact.user_factors, artifact.item_factors, threads=threads)
    user_ids = np.asarray(artifact.user_ids, dtype=object)
    item_ids = np.asarray(artifact.item_ids, dtype=object)
    unavailable = None if include_unavailable else np.flatnonzero(~artifact.available).astype(np.int32)
    if unavailable is not None and len(unavailable) == 0:
        unavailable = None
    purchases = artifact.purchases.tocsr()
    schema = pa.schema(
        [("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written = 0
    n_users = artifact.n_users
    try:
        with (
            Progress("recommend", total=n_users, unit="users", enabled=show_progress) as bar,
            pa_csv.CSVWriter(tmp, schema) as writer,
        ):
            for lo in range(0, n_users, batch_size):
                users = np.arange(lo, min(lo + batch_size, n_users))
                ids, scores = model.recommend(
                    users,
                    purchases[users],
                    N=min(n, artifact.n_items),
                    filter_already_liked_items=not include_purchased,
                    filter_items=unavailable,
                )
                ids = np.atleast_2d(ids)
                scores = np.atleast_2d(scores)
                valid = (ids >= 0) & np.isfinite(scores)
                rows, cols = mask_positions(valid)
                writer.write_table(
                    pa.table(
                        {
                            "user_id": pa.array(user_ids[users[rows]], pa.string()),
                            "rank": pa.array(cols + 1, pa.int32()),
                            "item_id": pa.array(item_ids[ids[rows, cols]], pa.string()),
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
