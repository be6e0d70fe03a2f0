"""How an endpoint proves who we are: small strategies with ``headers()`` and ``refresh()``.

``NoAuth``, ``BearerToken`` (a fixed token), ``ClientCredentials`` (OAuth 2.0 client secret) and
``SmartBackendServices`` (OAuth 2.0 client credentials with a signed JWT assertion, per
https://hl7.org/fhir/smart-app-launch/backend-services.html). The token strategies cache the access token
until shortly before it expires; ``refresh()`` forces a new one (the endpoint calls it after a 401).
"""
from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import requests

from adapters.errors import AuthError, TransientError, parse_retry_after

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300  # seconds; SMART Backend Services: exp no more than five minutes ahead


class Auth(ABC):
    """An auth strategy: headers for each request, and a way to get fresh credentials."""

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """Headers to add to the next request."""

    def refresh(self) -> None:
        """Drop cached credentials so the next ``headers()`` gets new ones. A no-op when there are none."""


class NoAuth(Auth):
    def headers(self) -> dict[str, str]:
        return {}


class BearerToken(Auth):
    """A token configured by hand; ``refresh()`` cannot renew it, so a second 401 is an ``AuthError``."""

    def __init__(self, token: str) -> None:
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def __repr__(self) -> str:  # never show the token
        return "BearerToken(***)"


class _TokenEndpointAuth(Auth):
    """Fetches an access token from an OAuth 2.0 token endpoint and caches it until near expiry."""

    #: A token is renewed this many seconds before it expires (or at half its life, if that is sooner).
    leeway = 60.0
    #: Assumed lifetime when the token endpoint does not say (``expires_in`` is only RECOMMENDED).
    default_lifetime = 300.0

    def __init__(
        self,
        token_url: str,
        scope: str | None,
        *,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (5, 30),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token_url = token_url
        self.scope = scope
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token()}"}

    def refresh(self) -> None:
        with self._lock:
            self._token = None
            self._renew_at = 0.0

    def access_token(self) -> str:
        with self._lock:
            now = self.clock()
            if self._token is None or now >= self._renew_at:
                token, lifetime = self._fetch()
                self._token = token
                self._renew_at = now + max(0.0, lifetime - min(self.leeway, lifetime / 2))
            return self._token

    @abstractmethod
    def _token_request(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """The form fields to post, and HTTP Basic credentials if any."""

    def _fetch(self) -> tuple[str, float]:
        data, basic = self._token_request()
        if self.scope:
            data["scope"] = self.scope
        try:
            response = self.session.post(
                self.token_url,
                data=data,
                auth=basic,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:  # posting for a token twice is harmless
            raise TransientError(f"token endpoint unreachable: {exc.__class__.__name__}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(
                f"token endpoint answered {response.status_code}",
                status=response.status_code,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        body = _json_or_empty(response)
        if response.status_code != 200 or not body.get("access_token"):
            reason = body.get("error_description") or body.get("error") or response.reason or "no access_token"
            raise AuthError(f"token endpoint refused the client: {reason}", status=response.status_code)
        try:
            lifetime = float(body.get("expires_in", self.default_lifetime))
        except (TypeError, ValueError):
            lifetime = self.default_lifetime
        return str(body["access_token"]), lifetime


class ClientCredentials(_TokenEndpointAuth):
    """OAuth 2.0 client credentials grant with a client secret (sent as HTTP Basic, RFC 6749 2.3.1)."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(token_url, scope, **kwargs)
        self.client_id = client_id
        self._client_secret = client_secret

    def _token_request(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        return {"grant_type": "client_credentials"}, (self.client_id, self._client_secret)

    def __repr__(self) -> str:
        return f"ClientCredentials({self.token_url!r}, {self.client_id!r}, ***)"


class SmartBackendServices(_TokenEndpointAuth):
    """SMART Backend Services: a client assertion JWT signed with our private key (RS384 or ES384).

    The assertion: header ``alg``, ``kid``, ``typ: JWT``; claims ``iss`` = ``sub`` = client id, ``aud`` = the
    token URL, ``exp`` at most five minutes ahead, a fresh ``jti`` each time, ``iat``.
    """

    ALGORITHMS = ("RS384", "ES384")

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key_pem: str | bytes,
        kid: str,
        alg: str = "RS384",
        scope: str | None = None,
        *,
        assertion_lifetime: int = MAX_ASSERTION_LIFETIME,
        **kwargs: Any,
    ) -> None:
        if alg not in self.ALGORITHMS:
            raise ValueError(f"alg must be one of {self.ALGORITHMS}, not {alg!r}")
        if not 0 < assertion_lifetime <= MAX_ASSERTION_LIFETIME:
            raise ValueError(f"assertion_lifetime must be 1..{MAX_ASSERTION_LIFETIME} seconds")
        super().__init__(token_url, scope, **kwargs)
        self.client_id = client_id
        self.kid = kid
        self.alg = alg
        self.assertion_lifetime = assertion_lifetime
        self._key = _load_private_key(private_key_pem, alg)

    def client_assertion(self) -> str:
        import jwt  # PyJWT

        now = int(self.clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + self.assertion_lifetime,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    def _token_request(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        return {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }, None

    def __repr__(self) -> str:
        return f"SmartBackendServices({self.token_url!r}, {self.client_id!r}, kid={self.kid!r}, alg={self.alg!r})"


def _load_private_key(pem: str | bytes, alg: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    expected = rsa.RSAPrivateKey if alg.startswith("RS") else ec.EllipticCurvePrivateKey
    if not isinstance(key, expected):
        raise ValueError(f"{alg} needs an {'RSA' if alg.startswith('RS') else 'EC'} private key")
    if alg == "ES384" and key.curve.name != "secp384r1":
        raise ValueError("ES384 needs a P-384 (secp384r1) key")
    return key


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
