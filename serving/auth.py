"""Bearer-token auth of the reward service: where the token comes from, how it is checked, and when it is required.

The token is read where it is used: by each replica (from its own environment or a mounted file, as the
RayService manifest provides it) and by the CLI before it starts anything. A service reachable beyond
loopback must have one unless `serve.allow_insecure_non_loopback` says otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from rayrlhf.core.config import ServeConfig


class TokenError(ValueError):
    """The configured token source exists but cannot be used (unreadable or empty file, empty variable)."""


def resolve_token(cfg: ServeConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token: `serve.token_file` if set, else the variable `serve.token_env`; None when neither has one.

    A configured file that is missing or empty, or a variable that is set but empty, is an error rather than
    "no token": it means the operator meant to set one.
    """
    if cfg.token_file:
        path = Path(cfg.token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise TokenError(f"serve.token_file {path}: cannot read the token: {e.strerror or e}") from e
        if not token:
            raise TokenError(f"serve.token_file {path} is empty")
        return token
    value = environ.get(cfg.token_env)
    if value is None:
        return None
    if not value.strip():
        raise TokenError(f"environment variable {cfg.token_env} (serve.token_env) is set but empty")
    return value.strip()


class BearerAuth:
    """Checks `Authorization: Bearer <token>` in constant time; with no token configured every request passes."""

    def __init__(self, token: str | None):
        self._token = token.encode() if token is not None else None

    @property
    def required(self) -> bool:
        return self._token is not None

    def allows(self, authorization: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest on bytes: the time taken does not depend on where the strings differ.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; any other name or address is treated as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
