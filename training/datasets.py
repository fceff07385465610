"""Convert public datasets into the events/catalog contract, so every tool runs on them.

    recsvc datasets list
    recsvc datasets convert NAME --data-dir ../shared/data --out var/datasets/NAME
    recsvc evaluate --dataset NAME --data-dir ../shared/data      # converts, then evaluates

Each converter reads the original files read-only and writes ``events.csv`` (and ``catalog.csv``
when the source describes items) into the output folder, via temporary names and a rename.
Rows the source itself gets wrong (a truncated last line, a missing customer) are skipped and
counted in the returned notes, so what reaches the loader is the dataset, not its damage.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from recsvc.core.ids import valid_id_mask


@dataclass
class Converted:
    """Result of a conversion: the files written and what happened on the way."""

    name: str
    events: Path
    catalog: Path | None
    split_days: float  # a sensible evaluation window for this dataset
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # sub-folder of --data-dir holding the source files
    files: tuple[str, ...]  # the first one must exist
    split_days: float
    description: str
    convert: Callable[[Path, Path], tuple[Path, Path | None, dict[str, Any]]]


def _write(table: pa.Table, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    pa_csv.write_csv(table, tmp)
    tmp.replace(path)
    return path


def _read_headerless(path: Path, names: list[str], delimiter: str = ",") -> tuple[pa.Table, int]:
    """All columns as strings; rows with the wrong column count are skipped and counted."""
    skipped: list[int] = []

    def skip(row: Any) -> str:
        skipped.append(1)
        return "skip"

    table = pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(column_names=names),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, invalid_row_handler=skip),
        convert_options=pa_csv.ConvertOptions(column_types={n: pa.string() for n in names}),
    )
    return table, len(skipped)


def _map_values(column: pa.ChunkedArray | pa.Array, mapping: dict[str, str]) -> np.ndarray:
    """Map a string column through ``mapping`` ("" for anything else), once per distinct value."""
    encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    values = np.array([mapping.get(v, "") for v in encoded.dictionary.to_pylist()] + [""], dtype=object)
    codes = pc.fill_null(encoded.indices, len(values) - 1).to_numpy(zero_copy_only=False)
    return values[codes]


def _events(
    user: Any,
    item: Any,
    event: Any,
    timestamp: Any,
    order_id: Any = None,
    quantity: Any = None,
    price: Any = None,
) -> pa.Table:
    columns: dict[str, Any] = {"user_id": user, "item_id": item, "event": event, "timestamp": timestamp}
    n = len(timestamp)
    columns["order_id"] = order_id if order_id is not None else pa.array([""] * n, pa.string())
    columns["quantity"] = quantity if quantity is not None else pa.array([None] * n, pa.float64())
    columns["price"] = price if price is not None else pa.array([None] * n, pa.float64())
    return pa.table(columns)


# --------------------------------------------------------------------------------------------
# Taobao UserBehavior
# --------------------------------------------------------------------------------------------

TAOBAO_EVENTS = {"pv": "view", "cart": "cart", "fav": "cart", "buy": "purchase"}


def convert_taobao(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """Taobao ``user,item,category,behavior,unix_ts`` (no header).

    ``pv`` -> view, ``cart`` -> cart, ``fav`` (wish list) -> cart (a similar strength of intent),
    ``buy`` -> purchase. The catalog lists each item with its category (``cat-<id>``).
    """
    table, skipped = _read_headerless(src, ["user_id", "item_id", "category_id", "behavior", "timestamp"])
    events = _map_values(table["behavior"], TAOBAO_EVENTS)
    known = events != ""
    table = table.filter(pa.array(known))
    events = events[known]
    ev = _events(table["user_id"], table["item_id"], pa.array(events, pa.string()), table["timestamp"])
    items = table.select(["item_id", "category_id"]).group_by("item_id").aggregate([("category_id", "min")])
    catalog = pa.table(
        {
            "item_id": items["item_id"],
            "category": pc.binary_join_element_wise(pa.scalar("cat-"), items["category_id_min"], ""),
        }
    )
    notes = {"rows_skipped_malformed": skipped, "rows_unknown_behavior": int((~known).sum())}
    return _write(ev, out / "events.csv"), _write(catalog, out / "catalog.csv"), notes


# --------------------------------------------------------------------------------------------
# Instacart
# --------------------------------------------------------------------------------------------

#: Instacart has no dates: every user's last order is placed at this instant and earlier orders
#: are dated backwards by ``days_since_prior_order``, so a time split tests each user's last order.
INSTACART_LAST_ORDER = _dt.datetime(2017, 5, 31, tzinfo=_dt.UTC)


def convert_instacart(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """Instacart ``df_sample.csv`` (orders joined with their products) -> purchase events.

    Timestamps are rebuilt per user from ``days_since_prior_order`` (see
    :data:`INSTACART_LAST_ORDER`); items of one order are ``add_to_cart_order`` seconds apart.
    """
    table = pa_csv.read_csv(src)
    user = table["user_id"].to_numpy().astype(np.int64)
    order_number = table["order_number"].to_numpy().astype(np.int64)
    gap = np.nan_to_num(pc.cast(table["days_since_prior_order"], pa.float64()).to_numpy(zero_copy_only=False))
    add_order = np.nan_to_num(
        pc.cast(table["add_to_cart_order"], pa.float64()).to_numpy(zero_copy_only=False)
    )
    # One entry per (user, order), sorted by user then order number.
    key = user * 100_000 + order_number
    _, first_row, order_of_row = np.unique(key, return_index=True, return_inverse=True)
    order_user = user[first_row]
    new_user = np.r_[True, order_user[1:] != order_user[:-1]]
    order_gap = np.where(new_user, 0.0, gap[first_row])
    cumulative = np.cumsum(order_gap)
    user_start = np.flatnonzero(new_user)
    user_of_order = np.cumsum(new_user) - 1
    day = cumulative - cumulative[user_start][user_of_order]  # days since the user's first order
    user_end = np.r_[user_start[1:], len(order_user)] - 1
    last_day = day[user_end][user_of_order]
    offset_days = (last_day - day)[order_of_row]  # 0 on each user's last order
    ts = INSTACART_LAST_ORDER.timestamp() - offset_days * 86_400 + add_order
    ev = _events(
        pc.cast(table["user_id"], pa.string()),
        pc.cast(table["product_id"], pa.string()),
        pa.array(["purchase"] * len(ts), pa.string()),
        pa.array(ts.astype(np.int64)),
        order_id=pc.cast(table["order_id"], pa.string()),
    )
    catalog = pa.table({"item_id": pc.unique(pc.cast(table["product_id"], pa.string()))})
    notes = {"orders": int(len(order_user)), "users": int(new_user.sum())}
    return _write(ev, out / "events.csv"), _write(catalog, out / "catalog.csv"), notes


# --------------------------------------------------------------------------------------------
# UCI Online Retail
# --------------------------------------------------------------------------------------------

_STOCK_CODE = r"^[0-9]{5}[A-Za-z]{0,3}$"  # products; POST, DOT, M, BANK CHARGES... are not


def convert_online_retail_rows(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """UCI Online Retail rows (``InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,
    CustomerID,Country``) -> purchases by customer, one order per invoice.

    Skipped: cancellations (``C`` invoices, negative quantities), rows without a customer,
    non-product codes. Lines of one invoice with the same code are merged (quantities summed).
    """
    table = pa_csv.read_csv(
        src,
        convert_options=pa_csv.ConvertOptions(
            column_types={"InvoiceNo": pa.string(), "StockCode": pa.string(), "CustomerID": pa.string()}
        ),
    )
    n0 = table.num_rows
    customer = pc.replace_substring_regex(pc.fill_null(table["CustomerID"], ""), r"\.0$", "")
    keep = pc.and_(
        pc.and_(pc.greater(pc.utf8_length(customer), 0), pc.invert(pc.starts_with(table["InvoiceNo"], "C"))),
        pc.and_(pc.greater(table["Quantity"], 0), pc.match_substring_regex(table["StockCode"], _STOCK_CODE)),
    )
    table = table.append_column("customer", customer).filter(keep)
    ts = _unix_seconds(table["InvoiceDate"], ("%Y-%m-%d %H:%M:%S", "%m/%d/%Y %H:%M", "%Y-%m-%d %H:%M"))
    table = table.append_column("ts", ts)
    merged = table.group_by(["customer", "InvoiceNo", "StockCode"]).aggregate(
        [("Quantity", "sum"), ("UnitPrice", "max"), ("ts", "min")]
    )
    ev = _events(
        merged["customer"],
        merged["StockCode"],
        pa.array(["purchase"] * merged.num_rows, pa.string()),
        merged["ts_min"],
        order_id=merged["InvoiceNo"],
        quantity=pc.cast(merged["Quantity_sum"], pa.float64()),
        price=merged["UnitPrice_max"],
    )
    ev = ev.sort_by("timestamp")
    items = table.group_by("StockCode").aggregate([("Description", "min"), ("UnitPrice", "max")])
    catalog = pa.table(
        {
            "item_id": items["StockCode"],
            "title": pc.fill_null(items["Description_min"], ""),
            "price": items["UnitPrice_max"],
        }
    )
    notes = {"rows_read": n0, "rows_kept": table.num_rows, "lines_merged": table.num_rows - merged.num_rows}
    return _write(ev, out / "events.csv"), _write(catalog, out / "catalog.csv"), notes


def _unix_seconds(column: pa.ChunkedArray, formats: tuple[str, ...]) -> pa.Array:
    """int64 Unix seconds from a column arrow already typed as timestamp, or strings in ``formats``."""
    column = column.combine_chunks()
    if not pa.types.is_timestamp(column.type):
        parsed = None
        for fmt in formats:
            attempt = pc.strptime(column, format=fmt, unit="s", error_is_null=True)
            parsed = attempt if parsed is None else pc.coalesce(parsed, attempt)
        column = parsed
    return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())


#: The first and last purchase invoice dates of the UCI dataset (invoices 536365 .. 581587).
RETAIL_FIRST = _dt.datetime(2010, 12, 1, 8, 26, tzinfo=_dt.UTC)
RETAIL_LAST = _dt.datetime(2011, 12, 9, 12, 50, tzinfo=_dt.UTC)
RETAIL_PURCHASE_LINES = 22_061  # lines after these are bad-debt adjustments and cancellations


def convert_online_retail_baskets(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """UCI baskets (one line per invoice, comma-separated stock codes, no customers or dates).

    Only the first 22,061 lines are purchase invoices (see SOURCE.txt). Each invoice becomes an
    anonymous shopper ``inv<line>`` and an order; dates are interpolated linearly between the first
    and last invoice dates (the lines are in chronological order). Repeated codes in one invoice
    are merged into one line with the count as quantity; non-product codes are dropped. Good for
    bundles and load benchmarks; a time split has no returning users, so ALS metrics are empty.
    """
    baskets = src.read_text(encoding="utf-8").splitlines()[:RETAIL_PURCHASE_LINES]
    lengths = np.array([len(line.split(",")) if line else 0 for line in baskets])
    codes = pa.array([c.strip() for line in baskets if line for c in line.split(",")], pa.string())
    line_of = np.repeat(np.arange(len(baskets)), lengths)
    keep = np.asarray(pc.match_substring_regex(codes, _STOCK_CODE).to_numpy(zero_copy_only=False), dtype=bool)
    table = pa.table({"line": line_of[keep], "code": codes.filter(pa.array(keep))})
    merged = table.group_by(["line", "code"]).aggregate([("line", "count")]).sort_by([("line", "ascending")])
    line = merged["line"].to_numpy()
    span = RETAIL_LAST.timestamp() - RETAIL_FIRST.timestamp()
    ts = (RETAIL_FIRST.timestamp() + line / max(len(baskets) - 1, 1) * span).astype(np.int64)
    invoice = pc.binary_join_element_wise(pa.scalar("inv"), pc.cast(pa.array(line + 1), pa.string()), "")
    ev = _events(
        invoice,
        merged["code"],
        pa.array(["purchase"] * merged.num_rows, pa.string()),
        pa.array(ts),
        order_id=invoice,
        quantity=pc.cast(merged["line_count"], pa.float64()),
    )
    catalog = pa.table({"item_id": pc.unique(merged["code"])})
    notes = {
        "invoices": len(baskets),
        "codes_dropped": int((~keep).sum()),
        "lines_merged": int(keep.sum()) - merged.num_rows,
    }
    return _write(ev, out / "events.csv"), _write(catalog, out / "catalog.csv"), notes


# --------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------


def _rating_events(user: pa.Array, item: pa.Array, rating: np.ndarray, ts: pa.Array) -> pa.Table:
    """Ratings >= 4 are treated as purchases (positive), lower ones as views (weak interest)."""
    event = np.where(rating >= 4, "purchase", "view").astype(object)
    seconds = pc.cast(ts, pa.int64())
    return _events(
        pc.cast(user, pa.string()), pc.cast(item, pa.string()), pa.array(event, pa.string()), seconds
    )


def convert_movielens_100k(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """MovieLens 100K ``u.data`` (tab-separated) + ``u.item``/``u.genre`` for titles and a genre."""
    table, skipped = _read_headerless(src, ["user", "item", "rating", "ts"], delimiter="\t")
    rating = pc.cast(table["rating"], pa.float64()).to_numpy(zero_copy_only=False)
    ev = _rating_events(table["user"], table["item"], rating, pc.cast(table["ts"], pa.int64()))
    catalog_path = None
    item_file = src.with_name("u.item")
    if item_file.exists():
        genres = []
        genre_file = src.with_name("u.genre")
        if genre_file.exists():
            genres = [
                line.split("|")[0]
                for line in genre_file.read_text(encoding="latin-1").splitlines()
                if "|" in line
            ]
        ids, titles, categories = [], [], []
        for line in item_file.read_text(encoding="latin-1").splitlines():
            parts = line.split("|")
            if len(parts) < 5:
                continue
            flags = parts[5:]
            first = next((i for i, f in enumerate(flags) if f == "1"), None)
            ids.append(parts[0])
            titles.append(parts[1])
            categories.append(genres[first] if first is not None and first < len(genres) else "")
        catalog_path = _write(
            pa.table({"item_id": ids, "title": titles, "category": categories}), out / "catalog.csv"
        )
    notes = {"rows_skipped_malformed": skipped, "positives": int((rating >= 4).sum())}
    return _write(ev, out / "events.csv"), catalog_path, notes


def convert_movielens_ratings(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """MovieLens ``ratings.csv`` (``userId,movieId,rating,timestamp``) + ``movies.csv`` if present."""
    table = pa_csv.read_csv(src)
    rating = pc.cast(table["rating"], pa.float64()).to_numpy(zero_copy_only=False)
    ev = _rating_events(table["userId"], table["movieId"], rating, pc.cast(table["timestamp"], pa.int64()))
    catalog_path = None
    movies = src.with_name("movies.csv")
    if movies.exists():
        m = pa_csv.read_csv(
            movies, convert_options=pa_csv.ConvertOptions(column_types={"movieId": pa.string()})
        )
        first_genre = pc.list_element(pc.split_pattern(m["genres"], "|"), 0)
        category = pc.if_else(pc.equal(first_genre, "(no genres listed)"), "", first_genre)
        catalog_path = _write(
            pa.table({"item_id": m["movieId"], "title": m["title"], "category": category}),
            out / "catalog.csv",
        )
    return _write(ev, out / "events.csv"), catalog_path, {"positives": int((rating >= 4).sum())}


# --------------------------------------------------------------------------------------------
# RetailRocket
# --------------------------------------------------------------------------------------------

RETAILROCKET_EVENTS = {"view": "view", "addtocart": "cart", "transaction": "purchase"}


def convert_retailrocket(src: Path, out: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """RetailRocket ``events.csv`` (``timestamp`` in ms, ``visitorid, event, itemid, transactionid``).

    ``addtocart`` -> cart, ``transaction`` -> purchase with ``order_id = transactionid``.
    """
    table = pa_csv.read_csv(
        src,
        convert_options=pa_csv.ConvertOptions(
            column_types={
                "visitorid": pa.string(),
                "itemid": pa.string(),
                "transactionid": pa.string(),
                "event": pa.string(),
            }
        ),
    )
    names = _map_values(table["event"], RETAILROCKET_EVENTS)
    known = names != ""
    table = table.filter(pa.array(known))
    ts = pc.divide(pc.cast(table["timestamp"], pa.int64()), 1000)
    ev = _events(
        table["visitorid"],
        table["itemid"],
        pa.array(names[known], pa.string()),
        ts,
        order_id=pc.fill_null(table["transactionid"], ""),
    )
    return _write(ev, out / "events.csv"), None, {"rows_unknown_event": int((~known).sum())}


# --------------------------------------------------------------------------------------------
# Registry and command line
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "taobao",
            "taobao-userbehavior-sample",
            ("UserBehavior_head84k.csv", "UserBehavior.csv"),
            2.0,
            "Taobao UserBehavior: page views, carts, favourites, purchases",
            convert_taobao,
        ),
        DatasetSpec(
            "instacart",
            "instacart-sample",
            ("df_sample.csv",),
            1.0,
            "Instacart orders (593 users); each user's last order is the test set",
            convert_instacart,
        ),
        DatasetSpec(
            "online-retail-uci",
            "online-retail-uci",
            ("OnlineRetail_head10k_rows.csv", "Online Retail.csv"),
            1.0,
            "UCI Online Retail rows with customers and dates",
            convert_online_retail_rows,
        ),
        DatasetSpec(
            "online-retail-uci-baskets",
            "online-retail-uci",
            ("online_retail_baskets_all_invoices.csv",),
            30.0,
            "UCI Online Retail, all 22k purchase invoices as anonymous baskets",
            convert_online_retail_baskets,
        ),
        DatasetSpec(
            "movielens-100k",
            "movielens-100k",
            ("u.data",),
            14.0,
            "MovieLens 100K ratings (>= 4 = purchase, else view)",
            convert_movielens_100k,
        ),
        DatasetSpec(
            "movielens-ratings",
            "movielens",
            ("ratings.csv",),
            30.0,
            "MovieLens ratings.csv (any size; >= 4 = purchase, else view)",
            convert_movielens_ratings,
        ),
        DatasetSpec(
            "retailrocket",
            "retailrocket",
            ("events.csv",),
            14.0,
            "RetailRocket e-commerce events.csv",
            convert_retailrocket,
        ),
    )
}


def source_file(name: str, data_dir: str | Path) -> Path:
    """The source file of dataset ``name`` under ``data_dir`` (its folder, or ``data_dir`` itself)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    spec = DATASETS[name]
    data_dir = Path(data_dir)
    for folder in (data_dir / spec.folder, data_dir):
        for file in spec.files:
            if (folder / file).is_file():
                return folder / file
    raise FileNotFoundError(
        f"dataset {name}: none of {', '.join(spec.files)} found in {data_dir / spec.folder} or {data_dir}"
    )


def convert(name: str, data_dir: str | Path, out_dir: str | Path) -> Converted:
    """Convert dataset ``name`` found under ``data_dir`` into ``out_dir``/events.csv (+ catalog.csv).

    Raises
    ------
    ValueError
        Unknown dataset name.
    FileNotFoundError
        The source file is not there.
    """
    src = source_file(name, data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events, catalog, notes = DATASETS[name].convert(src, out)
    notes = {"source": str(src), **notes}
    _check_ids(events)
    return Converted(name, events, catalog, DATASETS[name].split_days, notes)


def _check_ids(events: Path) -> None:
    """Converters must produce contract ids; a regression here should fail loudly, not as bad rows."""
    table = pa_csv.read_csv(
        events,
        convert_options=pa_csv.ConvertOptions(
            include_columns=["user_id", "item_id"],
            column_types={"user_id": pa.string(), "item_id": pa.string()},
        ),
    )
    for col in ("user_id", "item_id"):
        values = np.asarray(pc.unique(table[col]).to_numpy(zero_copy_only=False), dtype=object)
        if not valid_id_mask(values).all():
            raise ValueError(f"{events}: converter produced invalid {col} values")
