"""Dataset converters on small hand-written copies of each public format."""

from __future__ import annotations

import datetime as dt

import pytest

from recsvc.core.contract import CART, PURCHASE, VIEW
from recsvc.core.eventfiles import load_catalog, load_events
from training.datasets import DATASETS, INSTACART_LAST_ORDER, convert


def put(folder, name, text, encoding="utf-8"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding=encoding)


def converted(tmp_path, name):
    result = convert(name, tmp_path / "data", tmp_path / "out")
    events, report = load_events(result.events)
    assert report.rows_rejected == 0
    catalog = load_catalog(result.catalog)[0] if result.catalog else None
    return result, events, catalog


def test_taobao(tmp_path):
    put(
        tmp_path / "data" / "taobao-userbehavior-sample",
        "UserBehavior_head84k.csv",
        "1,100,7,pv,1511544070\n1,100,7,cart,1511544080\n1,101,8,fav,1511544090\n2,100,7,buy,1511544100\n"
        "2,102,9,pv\n",  # the truncated last line of the real sample
    )
    result, events, catalog = converted(tmp_path, "taobao")
    assert events.event.tolist() == [VIEW, CART, CART, PURCHASE]
    assert result.notes["rows_skipped_malformed"] == 1
    assert dict(zip(catalog.item_id, catalog.category, strict=True)) == {"100": "cat-7", "101": "cat-8"}


def test_instacart_dates_every_users_last_order_at_the_same_instant(tmp_path):
    put(
        tmp_path / "data" / "instacart-sample",
        "df_sample.csv",
        ",order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order,product_id,"
        "add_to_cart_order,reordered\n"
        "0,11,1,1,2,8,,196,1.0,0.0\n"
        "1,11,1,1,2,8,,14084,2.0,0.0\n"
        "2,12,1,2,3,7,15.0,196,1.0,1.0\n"
        "3,13,1,3,3,7,21.0,12427,1.0,0.0\n"
        "4,21,2,1,1,9,,196,1.0,0.0\n"
        "5,22,2,2,1,9,30.0,5,1.0,0.0\n",
    )
    result, events, _ = converted(tmp_path, "instacart")
    base = int(INSTACART_LAST_ORDER.timestamp())
    day = 86_400
    assert events.order_id.tolist() == ["11", "11", "12", "13", "21", "22"]
    assert events.timestamp.tolist() == [
        base - 36 * day + 1,
        base - 36 * day + 2,
        base - 21 * day + 1,
        base + 1,
        base - 30 * day + 1,
        base + 1,
    ]
    assert (events.event == PURCHASE).all() and result.notes == {**result.notes, "orders": 5, "users": 2}


def test_online_retail_rows(tmp_path):
    put(
        tmp_path / "data" / "online-retail-uci",
        "OnlineRetail_head10k_rows.csv",
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,WHITE HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
        "536365,85123A,WHITE HEART,2,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
        "536365,POST,POSTAGE,1,2010-12-01 08:26:00,18.0,17850.0,United Kingdom\n"
        "C536379,22556,CANCELLED,-1,2010-12-01 09:41:00,4.25,14527.0,United Kingdom\n"
        "536380,22728,ALARM CLOCK,24,2010-12-01 09:45:00,3.75,,United Kingdom\n"
        "536381,22728,ALARM CLOCK,4,2010-12-01 09:50:00,3.75,15311.0,United Kingdom\n",
    )
    _, events, catalog = converted(tmp_path, "online-retail-uci")
    assert events.user_id.tolist() == ["17850", "15311"]
    assert events.item_id.tolist() == ["85123A", "22728"]
    assert events.quantity.tolist() == [8.0, 4.0]  # two lines of one invoice merged
    assert events.order_id.tolist() == ["536365", "536381"]
    assert events.timestamp[0] == int(dt.datetime(2010, 12, 1, 8, 26, tzinfo=dt.UTC).timestamp())
    assert sorted(catalog.item_id.tolist()) == ["22728", "85123A"]


def test_online_retail_baskets(tmp_path):
    put(
        tmp_path / "data" / "online-retail-uci",
        "online_retail_baskets_all_invoices.csv",
        "85123A,71053,85123A\nPOST,22633\n22633\n",
    )
    result, events, _ = converted(tmp_path, "online-retail-uci-baskets")
    assert events.user_id.tolist() == ["inv1", "inv1", "inv2", "inv3"]
    assert events.order_id.tolist() == events.user_id.tolist()
    assert sorted(zip(events.item_id[:2], events.quantity[:2], strict=True)) == [
        ("71053", 1.0),
        ("85123A", 2.0),
    ]
    assert result.notes["codes_dropped"] == 1
    assert events.timestamp[0] < events.timestamp[-1]


def test_movielens_100k_positive_threshold_titles_and_shift(tmp_path):
    folder = tmp_path / "data" / "movielens-100k"
    put(folder, "u.data", "196\t242\t3\t881250949\n186\t302\t4\t891717742\n22\t242\t5\t878887116\n")
    put(
        folder,
        "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0\n",
        encoding="latin-1",
    )
    put(folder, "u.genre", "unknown|0\nAction|1\nAdventure|2\nAnimation|3\nChildren's|4\nComedy|5\nCrime|6\n")
    _, events, catalog = converted(tmp_path, "movielens-100k")
    assert events.event.tolist() == [VIEW, PURCHASE, PURCHASE]
    assert events.timestamp.tolist() == [881250949, 891717742, 878887116]  # 1997-98, kept as they are
    assert dict(zip(catalog.item_id, catalog.category, strict=True)) == {"242": "Comedy", "302": "Crime"}
    assert catalog.title[0] == "Kolya (1996)"


def test_movielens_ratings_csv(tmp_path):
    folder = tmp_path / "data" / "movielens"
    put(
        folder, "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,4.0,1260759179\n"
    )
    put(
        folder,
        "movies.csv",
        'movieId,title,genres\n31,Dangerous Minds (1995),Drama\n1029,"Dumbo (1941)",Animation|Children\n',
    )
    _, events, catalog = converted(tmp_path, "movielens-ratings")
    assert events.event.tolist() == [VIEW, PURCHASE] and events.timestamp.tolist() == [1260759144, 1260759179]
    assert catalog.category.tolist() == ["Drama", "Animation"]


def test_retailrocket(tmp_path):
    put(
        tmp_path / "data" / "retailrocket",
        "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433223236124,257597,addtocart,355908,\n"
        "1433224214164,257597,transaction,355908,4000\n"
        "1433224214999,1,unknown,1,\n",
    )
    result, events, catalog = converted(tmp_path, "retailrocket")
    assert events.event.tolist() == [VIEW, CART, PURCHASE]
    assert events.order_id.tolist() == ["", "", "4000"] and events.timestamp[0] == 1433221332
    assert catalog is None and result.notes["rows_unknown_event"] == 1


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        convert("nope", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="df_sample.csv"):
        convert("instacart", tmp_path, tmp_path / "out")
    assert {"taobao", "instacart", "online-retail-uci", "movielens-100k", "retailrocket"} <= set(DATASETS)
