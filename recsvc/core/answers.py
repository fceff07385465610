"""What an answer says about itself: where its items come from, and why it is a fallback.

Every recommendation, similar-items, popular and bundle answer names a :class:`Source`; a fallback
names a :class:`Reason`. The values are the strings the HTTP API and the OpenAPI document use.
"""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    """Where the items of an answer come from."""

    PERSONALIZED = "personalized"  # the model's list for this user (or item)
    REALTIME = "realtime"  # folded in from the user's events newer than the model
    FALLBACK = "fallback"  # popular items (unknown user or item, degraded service, experiment)


class Reason(StrEnum):
    """Why an answer is a fallback."""

    UNKNOWN_USER = "unknown_user"
    UNKNOWN_ITEM = "unknown_item"
    REDIS_UNAVAILABLE = "redis_unavailable"
    NOT_PUBLISHED = "not_published"
    EXPERIMENT = "experiment"  # the user's A/B variant serves popular items
    NO_REPURCHASES = "no_repurchases"  # buy again: no purchase of the user to rank


#: Degraded answers: no variant of an experiment defines them.
DEGRADED = frozenset({Reason.REDIS_UNAVAILABLE, Reason.NOT_PUBLISHED})


class Strategy(StrEnum):
    """One way of answering a user; a recommender tries a chain of them in order."""

    REALTIME = "realtime"  # fold in recent events (when the user has events newer than the model)
    CACHED = "cached"  # the user's precomputed top-K list (known users)
    POPULAR = "popular"  # popularity order
