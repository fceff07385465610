"""The id contract and the one id -> index map."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.ids import IdMap, as_id_map, check_id, is_valid_id, valid_id_mask


def test_id_contract():
    assert is_valid_id("sku-00017") and is_valid_id("a.b:c_d-e")
    for bad in ("", "a b", "x" * 129, "ünï", None, 7):
        assert not is_valid_id(bad)
    with pytest.raises(ValueError, match="user_id is empty"):
        check_id("", "user_id")
    mask = valid_id_mask(np.array(["ok", "no way", "x" * 129, "fine"], dtype=object))
    assert mask.tolist() == [True, False, False, True]


def test_id_map_is_a_mapping_in_model_order():
    ids = IdMap(["b", "a", "c"])
    assert dict(ids) == {"b": 0, "a": 1, "c": 2}
    assert list(ids) == ["b", "a", "c"] and len(ids) == 3
    assert ids["c"] == 2 and ids.get("zz", -1) == -1 and "a" in ids and "zz" not in ids
    assert ids.ids.tolist() == ["b", "a", "c"] and not ids.ids.flags.writeable


def test_positions_are_vectorised_with_minus_one_for_unknown_ids():
    ids = IdMap([f"i{k}" for k in range(1000)])
    values = np.array(["i999", "nope", "i0", "i999"], dtype=object)
    assert ids.positions(values).tolist() == [999, -1, 0, 999]
    assert ids.positions(np.zeros(0, dtype=object)).tolist() == []


def test_repeated_ids_are_refused_and_mappings_convert():
    with pytest.raises(ValueError, match="unique"):
        IdMap(["a", "a"]).get("a")
    assert as_id_map({"x": 1, "y": 0}).ids.tolist() == ["y", "x"]
    assert as_id_map(["p", "q"])["q"] == 1
    with pytest.raises(ValueError, match="positions 0..n-1"):
        as_id_map({"x": 5})
