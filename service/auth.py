"""API keys: each bound to one organization and a set of scopes, stored only as a hash.

A key looks like ``cb_<id>_<secret>``; the id finds the row, the secret's SHA-256 must match.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import timezone
from typing import Optional

from sqlalchemy import bindparam, insert, select, update

from service.errors import CasebridgeError
from service.store import Store, api_keys, now

SCOPES = ("cases:read", "cases:write", "fhir:read", "fhir:write", "admin")


class Unauthenticated(CasebridgeError):
    status = 401
    fhir_code = "login"
    title = "Authentication required"


class Forbidden(CasebridgeError):
    status = 403
    fhir_code = "forbidden"
    title = "Not allowed"


@dataclass(frozen=True)
class Actor:
    """Who is calling: an organization, through one of its keys, with some scopes."""
    organization_id: str
    key_id: Optional[str] = None
    scopes: frozenset = field(default_factory=frozenset)

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this key lacks the {scope} scope")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, organization_id: str, scopes: list[str], label: Optional[str] = None) -> str:
    """A new key; the only time its secret is seen."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(unknown)} (known: {', '.join(SCOPES)})")
    if not organization_id or not organization_id.strip():
        raise ValueError("name the organization the key belongs to")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with store.engine.begin() as conn:
        conn.execute(insert(api_keys).values(id=key_id, organization_id=organization_id, secret_hash=_hash(secret),
                                             scopes=" ".join(sorted(set(scopes))), label=label, created_at=now(),
                                             revoked=False))
    return f"cb_{key_id}_{secret}"


def parse_scopes(text: str) -> list[str]:
    """``cases:read,cases:write`` (commas or spaces) as a list; ``ValueError`` naming any unknown scope."""
    scopes = [s for s in text.replace(",", " ").split() if s]
    if not scopes:
        raise ValueError(f"name at least one scope (known: {', '.join(SCOPES)})")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(unknown)} (known: {', '.join(SCOPES)})")
    return scopes


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: everything but its secret (and the secret's hash)."""
    id: str
    organization_id: str
    scopes: tuple[str, ...]
    label: Optional[str]
    created_at: str
    revoked: bool


def list_keys(store: Store, organization_id: str) -> list[KeyInfo]:
    with store.reader.connect() as conn:
        rows = conn.execute(select(api_keys.c.id, api_keys.c.organization_id, api_keys.c.scopes, api_keys.c.label,
                                   api_keys.c.created_at, api_keys.c.revoked)
                            .where(api_keys.c.organization_id == organization_id)
                            .order_by(api_keys.c.created_at, api_keys.c.id)).all()
    return [KeyInfo(r.id, r.organization_id, tuple(r.scopes.split()), r.label, _iso(r.created_at), bool(r.revoked))
            for r in rows]


def revoke_key(store: Store, key_id: str) -> bool:
    """Revoke a key at once (its next request is a 401); False when there is no such key."""
    with store.engine.begin() as conn:
        result = conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked=True))
    return result.rowcount == 1


def _iso(stamp) -> str:
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).isoformat()


#: built once: every request runs it (through ``Store.lookup``, the driver's own speed)
_KEY_BY_ID = select(api_keys.c.id, api_keys.c.organization_id, api_keys.c.secret_hash, api_keys.c.scopes,
                    api_keys.c.revoked).where(api_keys.c.id == bindparam("key_id"))


def authenticate(store: Store, token: Optional[str]) -> Actor:
    if not token:
        raise Unauthenticated("send an API key: Authorization: Bearer <key>")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "cb":
        raise Unauthenticated("the API key is not valid")
    row = store.lookup(_KEY_BY_ID, {"key_id": parts[1]})
    if row is None or row.revoked or not hmac.compare_digest(row.secret_hash, _hash(parts[2])):
        raise Unauthenticated("the API key is not valid")
    return Actor(row.organization_id, row.id, frozenset(row.scopes.split()))
