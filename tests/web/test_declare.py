"""The declared parameters are the document's, and each parses exactly what its schema allows."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.core.config import Config
from recsvc.web import declare
from recsvc.web.errors import ApiError
from recsvc.web.views.docs import openapi_document
from tests.web.test_openapi import _routes

CONFIG = Config()
TABLE = declare.endpoints(CONFIG)
CONSOLE = declare.console_endpoints(CONFIG)
PARAMS = sorted(
    {
        (p.where, p.name, repr(p)): p for params in (*TABLE.values(), *CONSOLE.values()) for p in params
    }.values(),
    key=lambda p: (p.where, p.name, repr(p)),
)
IDS = [f"{p.where}:{p.name}:{i}" for i, p in enumerate(PARAMS)]


def test_every_route_has_a_declaration_and_the_document_carries_it(app):
    assert set(TABLE) == {(method, path) for path, method in _routes(app)}
    assert set(CONSOLE) == {(method, path) for path, method in _routes(app, console=True)}
    doc = openapi_document(CONFIG)
    for (method, path), params in TABLE.items():
        assert doc["paths"][path][method]["parameters"] == [p.openapi() for p in params], (method, path)


def _refused(param, values):
    with pytest.raises(ApiError) as info:
        param.parse(values)
    assert info.value.status == 400 and info.value.field == param.name


@pytest.mark.parametrize("param", PARAMS, ids=IDS)
def test_bounds_and_junk(param):
    """The schema's edges are accepted; a step past them, and junk, are a 400 naming the parameter."""
    assert param.parse([]) is None
    if isinstance(param, declare.Integer):
        assert param.parse([str(param.low)]) == param.low and param.parse([str(param.high)]) == param.high
        for bad in (str(param.low - 1), str(param.high + 1), "1.5", "", " 1", "0x1", "1e2"):
            _refused(param, [bad])
        _refused(param, [str(param.low), str(param.low)])  # given twice
    elif isinstance(param, declare.Number):
        if not param.low_open:
            assert param.parse([str(param.low)]) == param.low
        for bad in ("nan", "inf", "", "1_0", str(param.low - 1), "abc"):
            _refused(param, [bad])
        if param.high is not None:
            _refused(param, [str(param.high * 2 + 1)])
    elif isinstance(param, declare.Boolean):
        assert param.parse(["true"]) is True and param.parse(["false"]) is False
        for bad in ("1", "yes", "True", ""):
            _refused(param, [bad])
    elif isinstance(param, declare.TextList):
        _refused(param, [""])  # an empty entry
        _refused(param, [",".join(["a"] * (param.max_items + 1))])
    elif isinstance(param, declare.Text):
        _refused(param, [""])


TEXTS = [p for p in PARAMS if isinstance(p, declare.Text) and p.pattern]


@pytest.mark.parametrize("param", TEXTS, ids=[f"{p.where}:{p.name}" for p in TEXTS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_strings_generated_from_the_schema_are_accepted_and_others_refused(param, data):
    value = data.draw(st.from_regex(param.pattern, fullmatch=True))
    assert param.parse([value]) == value
    other = data.draw(st.text(max_size=40))
    if re.search(param.pattern, other) is None:
        _refused(param, [other])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.from_regex(declare.ID_REGEX, fullmatch=True), min_size=1, max_size=5))
def test_an_id_list_parses_what_its_schema_generates(ids):
    exclude = next(p for p in TABLE[("get", "/v1/popular")] if p.name == "exclude")
    assert exclude.parse([",".join(ids)]) == tuple(dict.fromkeys(ids))
