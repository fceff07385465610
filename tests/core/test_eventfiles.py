"""Loading and validation of events and catalog files: every rejection reason, with its location."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsvc.core.contract import CART, CLICK, EVENT_CODE, IMPRESSION, PURCHASE, VIEW
from recsvc.core.eventfiles import EVENT_REASON_ORDER, BadInputError, load_catalog, load_events
from recsvc.core.events import EventTable, duplicate_mask

HEADER = "user_id,item_id,event,timestamp,order_id,quantity,price,rec_id"
GOOD = "u1,i1,view,1600000000,,,,"


def write(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# One bad row per reason, each on a known line (line 1 is the header, line 2 a good row).
BAD_ROWS = {
    "malformed_row": ("u1,i1,view", None),
    "missing_field": ("u1,,view,1600000000,,,,", "item_id"),
    "invalid_user_id": ("user one,i1,view,1600000000,,,,", "user_id"),
    "invalid_item_id": ("u1,i/1,view,1600000000,,,,", "item_id"),
    "unknown_event": ("u1,i1,wishlist,1600000000,,,,", "event"),
    "invalid_timestamp": ("u1,i1,view,yesterday,,,,", "timestamp"),
    "invalid_order_id": ("u1,i1,purchase,1600000000,order #1,,,", "order_id"),
    "invalid_rec_id": ("u1,i1,click,1600000000,,,,rec id", "rec_id"),
    "invalid_quantity": ("u1,i1,purchase,1600000000,o1,-2,,", "quantity"),
    "invalid_price": ("u1,i1,purchase,1600000000,o1,1,abc,", "price"),
}


def test_every_rejection_reason_is_counted_with_file_line_and_column(tmp_path):
    reasons = list(BAD_ROWS)
    assert set(reasons) == set(EVENT_REASON_ORDER)
    lines = [HEADER, GOOD] + [BAD_ROWS[r][0] for r in reasons] + ["u2,i2,cart,1600000001,,,,"]
    path = write(tmp_path, "events.csv", *lines)
    table, report = load_events(path, max_bad_fraction=1.0)

    assert len(table) == 2
    assert report.rows_read == len(lines) - 1
    assert report.rows_loaded == 2
    assert report.rejected_by_reason == {r: 1 for r in reasons}
    for offset, reason in enumerate(reasons):
        (example,) = report.examples[reason]
        assert example.file == str(path)
        assert example.line == 3 + offset, reason  # header=1, good row=2
        assert example.column == BAD_ROWS[reason][1], reason
    assert "invalid_timestamp: 1 rows" in report.format()
    assert f"{path}:8 column timestamp: 'yesterday'" in report.format()


def test_a_row_is_counted_once_under_its_first_reason(tmp_path):
    path = write(tmp_path, "e.csv", HEADER, GOOD, "bad id!,i1,nonsense,never,,,,")
    _, report = load_events(path, max_bad_fraction=1.0)
    assert report.rejected_by_reason == {"invalid_user_id": 1}


def test_too_many_bad_rows_fails_with_location_and_counts(tmp_path):
    path = write(
        tmp_path, "e.csv", HEADER, GOOD, GOOD.replace("1600000000", "tomorrow"), "u3,i3,view,1600000002,,,,"
    )
    with pytest.raises(BadInputError) as info:
        load_events(path, max_bad_fraction=0.01)
    message = str(info.value)
    assert "1 of 3 event rows" in message and "nothing was written" in message
    assert f"{path}:3 column timestamp" in message
    assert (info.value.file, info.value.line, info.value.column) == (str(path), 3, "timestamp")
    # Within the allowed fraction the same file loads.
    table, report = load_events(path, max_bad_fraction=0.5)
    assert len(table) == 2 and report.rows_rejected == 1


def test_missing_required_column_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "e.csv", "user_id,item_id,timestamp", "u1,i1,1600000000")
    with pytest.raises(BadInputError) as info:
        load_events(path)
    assert f"{path}:1 column event: required column is missing" in str(info.value)


@pytest.mark.parametrize(
    "content, problem",
    [("", "empty or has no header"), (HEADER + "\n", "no event rows"), (None, "file not found")],
)
def test_empty_or_missing_files_are_clear_errors(tmp_path, content, problem):
    path = tmp_path / "e.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadInputError, match=problem):
        load_events(path)


def test_timestamps_in_every_accepted_shape(tmp_path):
    shapes = [
        "1600000000",
        "1600000000.9",
        "2020-09-13T12:26:40",
        "2020-09-13 12:26:40",
        "2020-09-13T12:26:40Z",
        "2020-09-13T14:26:40+02:00",
        "2020-09-13T12:26:40.750Z",
        "1600000000000",  # milliseconds
        "1600000000750",
        "1600000000000000",  # microseconds
    ]
    lines = (
        [HEADER] + [f"u{i},i1,view,{ts},,,," for i, ts in enumerate(shapes)] + ["u9,i1,view,2020-09-13,,,,"]
    )
    table, report = load_events(write(tmp_path, "e.csv", *lines))
    assert report.rows_rejected == 0
    assert table.timestamp.tolist() == [1600000000] * len(shapes) + [1599955200]


def test_timestamps_before_2000_are_events(tmp_path):
    # MovieLens 100K is from 1997-98; old catalogues and public data sets go back further.
    lines = [HEADER, "u1,i1,view,881250949,,,,", "u2,i1,view,1995-06-01T00:00:00Z,,,,", "u3,i1,view,1,,,,"]
    table, report = load_events(write(tmp_path, "e.csv", *lines))
    assert report.rows_rejected == 0
    assert table.timestamp.tolist() == [881250949, 801964800, 1]


@pytest.mark.parametrize(
    "value",
    ["0", "-5", "4102444800", "50000000000", "4102444800000", "2020-13-01", "12/09/2020", "1969-12-31"],
)
def test_out_of_range_or_unparseable_timestamps_are_rejected(tmp_path, value):
    _, report = load_events(
        write(tmp_path, "e.csv", HEADER, GOOD, f"u1,i1,view,{value},,,,"), max_bad_fraction=1
    )
    assert report.rejected_by_reason == {"invalid_timestamp": 1}


def test_optional_columns_defaults_and_new_event_types(tmp_path):
    path = write(
        tmp_path,
        "e.csv",
        HEADER,
        "u1,i1,impression,1600000000,,,,r-1",
        "u1,i1,click,1600000001,,,,r-1",
        "u1,i1,cart,1600000002,,,,",
        "u1,i1,purchase,1600000003,o-1,2,9.5,r-1",
    )
    table, _ = load_events(path)
    assert table.event.tolist() == [IMPRESSION, CLICK, CART, PURCHASE]
    assert table.order_id.tolist() == ["", "", "", "o-1"]
    assert table.quantity.tolist() == [1.0, 1.0, 1.0, 2.0]
    assert np.isnan(table.price[:3]).all() and table.price[3] == np.float32(9.5)
    assert table.rec_id.tolist() == ["r-1", "r-1", "", "r-1"]


def test_only_required_columns_and_unknown_columns_are_reported(tmp_path):
    path = write(tmp_path, "e.csv", "user_id,item_id,event,timestamp,note", "u1,i1,view,1600000000,hello")
    table, report = load_events(path)
    assert len(table) == 1 and table.order_id.tolist() == [""] and table.quantity.tolist() == [1.0]
    assert report.ignored_columns == {str(path): ["note"]}


def test_exact_duplicates_are_dropped_and_repeats_are_kept(tmp_path):
    path = write(
        tmp_path,
        "e.csv",
        HEADER,
        "u1,i1,view,1600000000,,,,",
        "u1,i1,view,1600000000,,,,",  # double-logged: dropped
        "u1,i1,view,1600000060,,,,",  # a second view a minute later: kept
        "u1,i1,purchase,1600000100,o1,1,5,",
        "u1,i1,purchase,1600000100,o1,1,5,",  # double-logged: dropped
        "u1,i1,purchase,1600000100,o1,2,5,",  # differs in quantity: kept
    )
    table, report = load_events(path)
    assert report.duplicates_dropped == 2
    assert report.rows_rejected == 0  # duplicates are not bad rows
    assert len(table) == 4
    assert table.timestamp.tolist() == [1600000000, 1600000060, 1600000100, 1600000100]


def test_duplicate_mask_matches_a_python_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 400))
        keys = [rng.integers(0, int(rng.integers(1, 5)), n) for _ in range(4)]
        seen, expected = set(), []
        for row in zip(*keys, strict=True):
            expected.append(row in seen)
            seen.add(row)
        assert duplicate_mask(keys).tolist() == expected


def test_several_files_are_merged_with_shared_ids(tmp_path):
    a = write(tmp_path, "a.csv", HEADER, "u1,i1,view,1600000000,,,,", "u2,i2,cart,1600000001,,,,")
    b = write(
        tmp_path, "b.csv", "user_id,item_id,event,timestamp", "u2,i1,purchase,1600000002", "u3,i3,view,x"
    )
    table, report = load_events([a, b], max_bad_fraction=0.5)
    assert report.files == [str(a), str(b)] and report.rows_read == 4 and report.rows_rejected == 1
    assert table.user_id.tolist() == ["u1", "u2", "u2"]
    codes, values = table.codes("user_id")
    assert values[codes].tolist() == ["u1", "u2", "u2"]
    assert report.examples["invalid_timestamp"][0].file == str(b)
    assert report.examples["invalid_timestamp"][0].line == 3


def test_parquet_with_typed_columns(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2, 3], pa.int64()),
                "item_id": ["a", "b", "bad id"],
                "event": ["view", "purchase", "view"],
                "timestamp": pa.array(
                    [1600000000_000, 1600000005_000, 1600000009_000], pa.timestamp("ms", tz="UTC")
                ),
                "quantity": pa.array([None, 3.0, None]),
            }
        ),
        path,
    )
    table, report = load_events(path, max_bad_fraction=0.5)
    assert table.user_id.tolist() == ["1", "2"]
    assert table.timestamp.tolist() == [1600000000, 1600000005]
    assert table.quantity.tolist() == [1.0, 3.0]
    (example,) = report.examples["invalid_item_id"]
    assert (example.line, example.column) == (3, "item_id")  # Parquet: 1-based row number


def test_event_table_by_hand_take_and_records():
    table = EventTable.from_records(
        [
            {"user_id": "u1", "item_id": "i1", "event": "view", "timestamp": 1600000000},
            {
                "user_id": "u2",
                "item_id": "i2",
                "event": "purchase",
                "timestamp": "2020-09-13T12:26:40Z",
                "order_id": "o",
            },
        ]
    )
    assert table.event.tolist() == [VIEW, EVENT_CODE["purchase"]]
    sub = table.take(np.array([False, True]))
    assert len(sub) == 1 and sub.user_id.tolist() == ["u2"] and sub.order_id.tolist() == ["o"]
    codes, values = sub.codes("item_id")
    assert values[codes].tolist() == ["i2"]
    with pytest.raises(ValueError, match="expected 2"):
        EventTable(
            user_id=np.array(["a", "b"], object),
            item_id=np.array(["x"], object),
            event=[0, 0],
            timestamp=[1, 2],
        )


def test_catalog_loading_and_every_catalog_reason(tmp_path):
    path = write(
        tmp_path,
        "catalog.csv",
        "item_id,title,category,price,available",
        "i1,Red shoe,shoes,19.90,true",
        "i2,,,,",
        "i3,Hat,hats,5,no",
        ",No id,x,1,true",
        "bad id,T,x,1,true",
        f"i4,{'x' * 600},x,1,true",
        f"i5,T,{'c' * 200},1,true",
        "i6,T,x,-1,true",
        "i7,T,x,1,maybe",
        "i1,Duplicate,shoes,1,true",
        "i8,T,x",
    )
    catalog, report = load_catalog(path, max_bad_fraction=1.0)
    assert catalog.item_id.tolist() == ["i1", "i2", "i3"]
    assert catalog.title.tolist() == ["Red shoe", "", "Hat"]
    assert catalog.category.tolist() == ["shoes", "", "hats"]
    assert catalog.price[0] == np.float32(19.9) and np.isnan(catalog.price[1])
    assert catalog.available.tolist() == [True, True, False]
    assert report.rejected_by_reason == {
        "missing_field": 1,
        "invalid_item_id": 1,
        "invalid_title": 1,
        "invalid_category": 1,
        "invalid_price": 1,
        "invalid_available": 1,
        "duplicate_item_id": 1,
        "malformed_row": 1,
    }
    assert report.examples["duplicate_item_id"][0].line == 11
    with pytest.raises(BadInputError, match="catalog rows"):
        load_catalog(path)


def test_header_spaces_bom_and_many_malformed_rows(tmp_path):
    lines = ["\ufeffuser_id , item_id,event,timestamp"] + ["u1,i1,view,1600000000"] * 1 + ["broken"] * 30
    lines += ["u2,i2,cart,1600000001"]
    table, report = load_events(write(tmp_path, "e.csv", *lines), max_bad_fraction=1.0)
    assert table.user_id.tolist() == ["u1", "u2"]
    assert report.rejected_by_reason == {"malformed_row": 30}
    assert [ex.line for ex in report.examples["malformed_row"]] == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    "value, expected",
    [
        (881250949, 881250949),
        ("1600000000", 1600000000),
        (1600000000123, 1600000000),
        (1.6e15, 1600000000),
        ("1997-09-20T00:00:00Z", 874713600),
    ],
)
def test_parse_timestamp_matches_the_file_loader(tmp_path, value, expected):
    from recsvc.core.contract import parse_timestamp

    assert parse_timestamp(value) == expected
    table, _ = load_events(write(tmp_path, "e.csv", HEADER, f"u1,i1,view,{value},,,,"))
    assert table.timestamp.tolist() == [expected]


@pytest.mark.parametrize("value", [0, -1, 4102444800, 5e10, float("nan"), "soon", True])
def test_parse_timestamp_refuses_what_is_not_an_instant(value):
    from recsvc.core.contract import parse_timestamp

    with pytest.raises(ValueError):
        parse_timestamp(value)
