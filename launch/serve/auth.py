"""API-key check: ``Authorization: Bearer KEY`` compared in constant time."""

from __future__ import annotations

import hmac


def bearer_ok(header: str | None, key: str | None) -> bool:
    """True when no key is configured, or the header carries exactly this key."""
    if not key:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
