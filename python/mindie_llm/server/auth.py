# SPDX-License-Identifier: Apache-2.0
"""API-key checks shared by the HTTP and gRPC front ends.

Owns the constant-time comparison and the parsing of the two accepted credential forms
(``Authorization: Bearer <key>`` and ``x-api-key: <key>``). Must not import the engine, torch or
any web framework: both servers call it with plain strings.
"""
from __future__ import annotations

import hmac

__all__ = ["api_key_matches", "extract_api_key"]


def api_key_matches(provided: str | None, expected: str) -> bool:
    """True if ``provided`` equals ``expected``, compared in constant time.

    The comparison runs over UTF-8 bytes with :func:`hmac.compare_digest`, so its duration does not
    depend on how many leading characters match. A missing key never matches.
    """
    if provided is None:
        # Still spend a comparison so that "no key" and "wrong key" take the same path.
        hmac.compare_digest(b"", expected.encode("utf-8"))
        return False
    return hmac.compare_digest(provided.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def extract_api_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a client sent: the token of ``Authorization: Bearer <token>``, else ``x-api-key``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key:
        return x_api_key.strip()
    return None
