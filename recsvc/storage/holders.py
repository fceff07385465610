"""Lock and lease tokens that name their holder, so a holder that died is recognised at once.

A Redis lock (the dump's) or lease (a publish's) outlives a ``SIGKILL``ed holder until its expiry
(minutes). The token :func:`holder_token` writes names the holder's host and process; a later run
on the same host that finds the key can check that process (:func:`take_over_if_dead`) and, when
it is gone, delete the key -- only if it still holds that token -- instead of waiting. A holder on
another host is never second-guessed: its key expires as before.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis

from recsvc.storage import codec

_SEP = "/"

# Delete the key only if it still holds the dead holder's token (another run may have taken over).
_DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def holder_token() -> str:
    """``<host>/<pid>/<random>``: unique, and says who holds it."""
    return _SEP.join((socket.gethostname(), str(os.getpid()), uuid.uuid4().hex))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def take_over_if_dead(client: redis.Redis, key: str) -> str | None:
    """Delete ``key`` when its holder is a dead process of this host; return that token, else None."""
    raw = client.get(key)
    if raw is None:
        return None
    token = codec.text(raw)
    parts = token.split(_SEP)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    if int(parts[1]) == os.getpid() or _alive(int(parts[1])):
        return None
    return token if client.eval(_DELETE_IF, 1, key, token) else None
