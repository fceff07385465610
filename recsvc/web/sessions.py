"""Console sessions: a signed, expiring token in an HttpOnly cookie, given for a valid API key.

Browsers cannot send ``Authorization`` headers when a person follows a link, and keys never go in
URLs, so the console has a login form: the key is posted once, checked like any API key (constant
time, the wrong-key throttle, never logged), and the answer sets a cookie holding
``<expiry>.<mac>`` where ``mac = HMAC-SHA256(HMAC-SHA256(key, purpose), expiry)``.

* The secret is the API key itself, so every worker and every instance checks the cookie without
  sharing any other secret, and removing a key from ``RECSVC_API_KEYS`` ends its sessions.
* The cookie names no key (a token is checked against every configured key, each in constant
  time), and the key cannot be recovered from it.
* ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site makes the browser send
  it: the console is read-only, and this also stops cross-site requests riding on it),
  ``Path=/console`` (the API never sees it), ``Secure`` when the request came over HTTPS.
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE = "recsvc_console"
COOKIE_PATH = "/console"
_PURPOSE = b"recsvc console session v1"


def _mac(key: str, expiry: int) -> str:
    secret = hmac.new(key.encode("utf-8"), _PURPOSE, hashlib.sha256).digest()
    return hmac.new(secret, str(expiry).encode("ascii"), hashlib.sha256).hexdigest()


def issue(key: str, lifetime_s: float, now: float | None = None) -> str:
    """A session token for ``key`` that expires ``lifetime_s`` from ``now``."""
    expiry = int((time.time() if now is None else now) + lifetime_s)
    return f"{expiry}.{_mac(key, expiry)}"


def valid(token: str | None, configured: tuple[str, ...], now: float | None = None) -> bool:
    """Whether ``token`` was issued for one of ``configured`` and has not expired.

    Every configured key is tried, each compared in constant time; a malformed token is invalid.
    """
    if not token or not configured or len(token) > 128:
        return False
    expiry_text, _, mac = token.partition(".")
    if not expiry_text.isdigit() or len(mac) != 64:
        return False
    expiry = int(expiry_text)
    if expiry <= (time.time() if now is None else now):
        return False
    found = False
    for key in configured:
        found |= hmac.compare_digest(mac.encode("ascii", "replace"), _mac(key, expiry).encode("ascii"))
    return found
