"""The one serving policy: a contract every strategy honours, and the chain's fallbacks.

Like implicit's recommender contract tests, :class:`StrategyContract` is run by every strategy the
recommender can serve (real time, cached top-K, popular): at most ``n`` items, every filter
honoured, purchases excluded, scores ordered with ties broken by the lower item index, the same
answer twice. The model is tiny and random (tests.factories.make_artifact) on a real Redis.
"""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.answers import Reason, Source, Strategy
from recsvc.serving.health import RedisHealth
from recsvc.serving.model import ModelCache
from recsvc.serving.recommender import NO_FILTERS, Chain, FilterArgs, Recommender, Variant
from recsvc.storage.stream import append_events
from tests.factories import make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

T = 1_718_000_000


@pytest.fixture
def artifact(models_dir):
    from recsvc.core.artifact import write_artifact

    a = make_artifact(n_users=20, n_items=60, factors=8, seed=4)
    a.manifest["params"] = {"factors": 8, "regularization": 0.5, "alpha": 2.0, "scaling": "linear"}
    a.manifest["trained_until"] = T
    a.available[[7, 8, 9]] = False
    a.popularity[:] = 1.0  # every item equally popular: ties everywhere, broken by item index
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def recommender(published, config, redis_client) -> Recommender:
    return Recommender(config, redis_client, ModelCache(config, check_interval_s=0.0), RedisHealth(1.0))


def _recent(redis_client, config, user_id: str, events: list[tuple[str, str]]) -> None:
    rows = [
        {"user_id": user_id, "item_id": item, "event": kind, "timestamp": T + 10 + k}
        for k, (item, kind) in enumerate(events)
    ]
    append_events(redis_client, rows, stream=config.events.stream, history_length=50, history_ttl_s=600)


class StrategyContract:
    """What every strategy must do. Subclasses give the strategy and a user it applies to."""

    strategy: Strategy
    expected_source: Source

    @pytest.fixture
    def user(self) -> str:
        raise NotImplementedError

    def ask(self, recommender, user, n=10, wanted=NO_FILTERS):
        answer = recommender.recommend(user, n, wanted, variant=Variant(Chain((self.strategy,))))
        assert answer.source == self.expected_source, answer
        return answer

    def test_at_most_n_items(self, recommender, user):
        for n in (1, 5, 40):
            answer = self.ask(recommender, user, n)
            assert len(answer.items) == n  # 60 items, a few filtered: always enough
            assert len(set(answer.items.tolist())) == n

    def test_filters_are_honoured(self, recommender, user, artifact):
        wanted = FilterArgs(categories=("hats",), min_price=5.0, max_price=40.0, exclude=("i11", "i14"))
        items = self.ask(recommender, user, 50, wanted).items
        assert len(items)
        for i in items.tolist():
            assert artifact.categories[artifact.category[i]] == "hats"
            assert 5.0 <= artifact.price[i] <= 40.0
            assert artifact.available[i]
            assert artifact.item_ids[i] not in ("i11", "i14")

    def test_out_of_stock_and_purchased_items_are_excluded(self, recommender, user, artifact):
        items = set(self.ask(recommender, user, 60).items.tolist())
        assert not items & {7, 8, 9}
        known = artifact.user_index().get(user)
        if known is not None:
            assert not items & set(artifact.purchases[known].indices.tolist())

    def test_scores_ordered_and_ties_by_lower_index(self, recommender, user):
        answer = self.ask(recommender, user, 40)
        scores, items = answer.scores.astype(np.float64), answer.items
        assert np.all(np.diff(scores) <= 1e-9)
        for k in range(len(items) - 1):
            if scores[k] == scores[k + 1]:
                assert items[k] < items[k + 1]

    def test_same_answer_twice(self, recommender, user):
        first, second = self.ask(recommender, user), self.ask(recommender, user)
        assert first.items.tolist() == second.items.tolist()
        np.testing.assert_array_equal(first.scores, second.scores)


class TestCachedStrategy(StrategyContract):
    strategy, expected_source = Strategy.CACHED, Source.PERSONALIZED

    @pytest.fixture
    def user(self):
        return "u3"


class TestRealtimeStrategy(StrategyContract):
    strategy, expected_source = Strategy.REALTIME, Source.REALTIME

    @pytest.fixture
    def user(self, redis_client, config, published):
        # A known user with new events, one of them a purchase that must be excluded too.
        _recent(redis_client, config, "u5", [("i20", "view"), ("i21", "cart"), ("i22", "purchase")])
        return "u5"

    def test_new_purchases_are_excluded(self, recommender, user):
        assert 22 not in self.ask(recommender, user, 60).items.tolist()


class TestPopularStrategy(StrategyContract):
    strategy, expected_source = Strategy.POPULAR, Source.FALLBACK

    @pytest.fixture
    def user(self):
        return "a-visitor"


# ------------------------------------------------------------------------------------------------
# The default chain
# ------------------------------------------------------------------------------------------------


def test_default_chain_per_kind_of_user(recommender, redis_client, config):
    assert recommender.recommend("u3", 5).source == Source.PERSONALIZED
    unknown = recommender.recommend("nobody", 5)
    assert (unknown.source, unknown.reason) == (Source.FALLBACK, Reason.UNKNOWN_USER)
    _recent(redis_client, config, "nobody", [("i30", "view")])
    assert recommender.recommend("nobody", 5).source == Source.REALTIME
    _recent(redis_client, config, "u3", [("i30", "cart")])
    assert recommender.recommend("u3", 5).source == Source.REALTIME


def test_a_failing_strategy_falls_through_to_the_next(recommender, redis_client, config, monkeypatch):
    from recsvc.serving import realtime

    def broken(*args, **kwargs):
        raise RuntimeError("fold-in bug")

    monkeypatch.setattr(realtime, "realtime_vector", broken)
    _recent(redis_client, config, "u3", [("i30", "cart")])
    _recent(redis_client, config, "nobody", [("i30", "cart")])
    assert recommender.recommend("u3", 5).source == Source.PERSONALIZED
    visitor = recommender.recommend("nobody", 5)
    assert (visitor.source, visitor.reason) == (Source.FALLBACK, Reason.UNKNOWN_USER)


def test_variant_of_an_unpublished_version_serves_the_live_one_unapplied(recommender, published):
    answer = recommender.recommend("u3", 5, variant=Variant.of("personalized", "no-such-version"))
    assert answer.model_version == published.version and not answer.variant_applied
    assert answer.source == Source.PERSONALIZED


def test_nothing_published_is_a_degraded_popular_answer(config, redis_client, artifact):
    # No `published` fixture: Redis is empty; the newest local artifact answers.
    recommender = Recommender(config, redis_client, ModelCache(config), RedisHealth(1.0))
    answer = recommender.recommend("u3", 5)
    assert (answer.source, answer.reason) == (Source.FALLBACK, Reason.NOT_PUBLISHED)
    assert answer.model is not None and answer.model.origin == "artifact" and len(answer.items) == 5
