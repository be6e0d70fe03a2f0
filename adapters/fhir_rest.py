"""A partner's FHIR R4 REST API over ``requests``.

Statuses and network failures become ``adapters.errors`` classes; nothing here sleeps or retries except
the rate limiter and one retry after a 401 with refreshed credentials (the Celery task owns retries).

Which failures leave a write ambiguous (``AmbiguousWrite``: look before retrying):
- a read timeout, or a connection lost after the request went out;
- 500, 502, 504 on a write: a gateway or server gave up, but the partner may have committed it.
Which do not (``TransientError``): connect timeouts and refused or unresolvable connections (nothing was
sent), and 429 / 503 (the partner turned the request away).
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import orjson
import requests
import urllib3.exceptions

from adapters.auth import Auth, NoAuth
from adapters.base import Capabilities, Page, PartnerEndpoint, SearchParams, Versioned
from adapters.errors import (
    AmbiguousWrite,
    AuthError,
    NotFound,
    NotSupported,
    PartnerError,
    PermanentError,
    SearchExpired,
    TransientError,
    VersionConflict,
    parse_retry_after,
    says_search_expired,
)

FHIR_JSON = "application/fhir+json"

_LOCATION = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/(?P<vid>[A-Za-z0-9\-.]{1,64}))?/?$"
)
_ETAG = re.compile(r'^\s*(?:W/)?"?(?P<vid>[^"]*)"?\s*$')


def etag_version(etag: str | None) -> str | None:
    """``W/"3"`` -> ``"3"``; ``None`` for no ETag."""
    if not etag:
        return None
    match = _ETAG.match(etag)
    return match.group("vid") or None if match else None


def as_etag(version_or_etag: str) -> str:
    """``"3"`` or ``'W/"3"'`` -> ``'W/"3"'``, the form ``If-Match`` takes on FHIR servers."""
    return f'W/"{etag_version(version_or_etag) or version_or_etag}"'


def parse_location(location: str | None) -> tuple[str | None, str | None, str | None]:
    """``.../Patient/123/_history/3`` -> ``("Patient", "123", "3")``; absolute or relative."""
    if not location:
        return None, None, None
    path = urlsplit(location).path if "://" in location else location.split("?", 1)[0]
    match = _LOCATION.search(path)
    if not match:
        return None, None, None
    return match.group("type"), match.group("id"), match.group("vid")


class Limiter(Protocol):
    """Spaces requests: ``acquire()`` returns when the next may go (the seconds it waited)."""

    def acquire(self) -> float: ...


class TokenBucket:
    """At most ``rate`` requests a second on average, bursts of ``burst``; ``acquire()`` sleeps as needed."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is there; returns the seconds slept."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1  # reserve; a negative balance is the wait the next callers queue behind
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait


class FhirRestEndpoint(PartnerEndpoint):
    """A partner's FHIR R4 server.

    ``quirks``: partner behaviour the CapabilityStatement does not tell (see ``profiles``), applied on top
    of the statement; ``rebase_next_links: True`` rewrites next links that name another host (a partner
    behind a proxy that leaks its internal address) onto ``base_url``'s host instead of refusing them.
    ``rate_limit``: requests a second, or a ``Limiter`` (a ``TokenBucket``, or a pace shared elsewhere).
    ``capability_statement``: use this instead of fetching ``/metadata``.
    """

    def __init__(
        self,
        base_url: str,
        auth: Auth | None = None,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (5, 30),
        quirks: Mapping[str, Any] | None = None,
        rate_limit: float | Limiter | None = None,
        *,
        capability_statement: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.auth = auth or NoAuth()
        self.session = session or self._own_session(self.base_url)
        self.timeout = timeout
        self.quirks = dict(quirks or {})
        # a number: this endpoint's own bucket; else anything with the bucket's acquire() (a pace shared
        # with other processes, say)
        self.limiter = TokenBucket(rate_limit) if isinstance(rate_limit, (int, float)) else rate_limit
        self._statement = dict(capability_statement) if capability_statement else None
        self._capabilities: Capabilities | None = None

    def __repr__(self) -> str:
        return f"FhirRestEndpoint({self.base_url!r}, auth={self.auth!r})"

    @staticmethod
    def _own_session(base_url: str) -> requests.Session:
        """A session with the environment's proxies and CA bundle for this partner read once. requests
        would read them (and ~/.netrc, whose credentials must not replace ours) on every request, which
        costs more than building the request."""
        session = requests.Session()
        settings = session.merge_environment_settings(base_url, {}, None, None, None)
        session.proxies.update(settings["proxies"])
        if base_url.startswith("https:"):  # a CA bundle named by the environment (over http there is none to check)
            session.verify = settings["verify"]
        session.trust_env = False
        return session

    # --- the port ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            statement = self._statement or self._request("GET", "metadata").json()
            self._capabilities = Capabilities.from_capability_statement(statement, self.quirks)
        return self._capabilities

    def read(self, resource_type: str, resource_id: str) -> Versioned:
        response = self._request("GET", f"{resource_type}/{resource_id}")
        return self._versioned(response, resource_type, resource_id)

    def search_page(self, resource_type: str, params_or_url: SearchParams | str) -> Page:
        if isinstance(params_or_url, str):
            response = self._request("GET", self._next_url(params_or_url), paging=True)
        else:
            response = self._request("GET", resource_type, params=self._clamp(params_or_url))
        bundle = _json(response)
        if bundle.get("resourceType") != "Bundle":
            raise PermanentError(
                f"search answered {bundle.get('resourceType')!r}, not a Bundle", status=response.status_code
            )
        resources = [
            entry["resource"]
            for entry in bundle.get("entry") or []
            if isinstance(entry.get("resource"), dict) and (entry.get("search") or {}).get("mode") != "outcome"
        ]
        next_link = next(
            (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
        )
        return Page(resources=resources, next=next_link or None, total=bundle.get("total"), bundle=bundle)

    def create(self, resource: Mapping[str, Any], if_none_exist: str | None = None) -> Versioned:
        resource_type = _resource_type(resource)
        headers = {}
        if if_none_exist:
            if not self.capabilities().conditional_create(resource_type):
                # A partner without conditional create ignores the header and makes a duplicate.
                raise NotSupported(f"{resource_type}: the partner does not support conditional create")
            headers["If-None-Exist"] = if_none_exist.lstrip("?")
        body = {k: v for k, v in resource.items() if k != "id"}
        response = self._request("POST", resource_type, json=body, headers=headers, write=True)
        return self._versioned(response, resource_type)

    def update(self, resource: Mapping[str, Any], if_match: str | None = None) -> Versioned:
        resource_type = _resource_type(resource)
        resource_id = resource.get("id")
        if not resource_id:
            raise ValueError(f"{resource_type} has no id to update")
        headers = {"If-Match": as_etag(if_match)} if if_match else {}
        response = self._request(
            "PUT", f"{resource_type}/{resource_id}", json=dict(resource), headers=headers, write=True,
            conditional=bool(if_match),
        )
        return self._versioned(response, resource_type, resource_id)

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        return self._post_bundle(bundle, "transaction")

    def batch(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        return self._post_bundle(bundle, "batch")

    def operation(
        self, resource_type: str | None, name: str, parameters: Mapping[str, Any]
    ) -> dict[str, Any]:
        """POST ``[base]/[type]/$name``. Treated as a query ($member-match changes nothing): a lost answer
        is a ``TransientError``, not an ``AmbiguousWrite``."""
        path = f"{resource_type}/${name.lstrip('$')}" if resource_type else f"${name.lstrip('$')}"
        return _json(self._request("POST", path, json=dict(parameters)))

    # --- HTTP --------------------------------------------------------------------------------------

    def _post_bundle(self, bundle: Mapping[str, Any], kind: str) -> dict[str, Any]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != kind:
            raise ValueError(f"expected a Bundle of type {kind!r}, got {bundle.get('type')!r}")
        conditional = any((e.get("request") or {}).get("ifMatch") for e in bundle.get("entry") or [])
        response = self._request("POST", "", json=dict(bundle), write=True, conditional=conditional)
        return _json(response)

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        write: bool = False,
        conditional: bool = False,
        paging: bool = False,
    ) -> requests.Response:
        url = path_or_url if "://" in path_or_url else urljoin(self.base_url, path_or_url)
        base_headers = {"Accept": FHIR_JSON}
        if json is not None:
            base_headers["Content-Type"] = FHIR_JSON
        if write:
            base_headers["Prefer"] = "return=representation"
        body = None if json is None else orjson.dumps(json)  # several times faster than requests' encoder
        for attempt in (1, 2):
            if self.limiter is not None:
                self.limiter.acquire()
            sent_headers = {**base_headers, **self.auth.headers(), **(headers or {})}
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=body,
                    headers=sent_headers,
                    timeout=self.timeout,
                    allow_redirects=not write,
                )
            except requests.RequestException as exc:
                raise _network_error(exc, method, url, write) from exc
            if response.status_code == 401 and attempt == 1:
                self.auth.refresh()  # an expired token: get a new one and try once more
                continue
            break
        if 200 <= response.status_code < 300:
            return response
        raise _status_error(response, method, url, write=write, conditional=conditional, paging=paging)

    def _clamp(self, params: SearchParams) -> dict[str, Any]:
        params = dict(params)
        limit = self.quirks.get("max_page_size")
        if limit and "_count" in params:
            try:
                params["_count"] = str(min(int(str(params["_count"])), int(limit)))
            except ValueError:
                pass
        return params

    def _next_url(self, link: str) -> str:
        url = urljoin(self.base_url, link)
        ours, theirs = urlsplit(self.base_url), urlsplit(url)
        if (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc):
            return url
        if self.quirks.get("rebase_next_links"):
            return urlunsplit((ours.scheme, ours.netloc, theirs.path, theirs.query, ""))
        raise PermanentError(
            f"next link {theirs.scheme}://{theirs.netloc} is not the partner's host {ours.netloc}; "
            "not sending our credentials there (set quirk rebase_next_links if the partner leaks a proxy host)"
        )

    def _versioned(self, response: requests.Response, resource_type: str, fallback_id: str | None = None) -> Versioned:
        body = _json(response) if response.content else {}
        etag = response.headers.get("ETag")
        _, loc_id, loc_vid = parse_location(response.headers.get("Location") or response.headers.get("Content-Location"))
        resource = body if body.get("resourceType") == resource_type else {}
        resource_id = resource.get("id") or loc_id or fallback_id
        version_id = etag_version(etag) or (resource.get("meta") or {}).get("versionId") or loc_vid
        if not resource:  # Prefer ignored, or an OperationOutcome instead of the resource: a stub
            resource = {"resourceType": resource_type, "id": resource_id}
            if version_id:
                resource["meta"] = {"versionId": version_id}
        if etag is None and version_id:
            etag = as_etag(version_id)
        return Versioned(resource, resource_id, version_id, etag)


def _resource_type(resource: Mapping[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not resource_type:
        raise ValueError("resource has no resourceType")
    return str(resource_type)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except ValueError as exc:
        raise PermanentError(
            f"partner answered {response.status_code} with a body that is not JSON", status=response.status_code
        ) from exc
    if not isinstance(body, dict):
        raise PermanentError("partner answered JSON that is not an object", status=response.status_code)
    return body


def _outcome(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = orjson.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None


def _never_sent(exc: BaseException) -> bool:
    """Whether a network failure happened before the request left (connect timeout, refused, DNS, TLS)."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError, requests.exceptions.ProxyError)):
        return True
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
            return True
        if isinstance(current, urllib3.exceptions.MaxRetryError) and current.reason is not None:
            pending.append(current.reason)
        pending.extend(a for a in current.args if isinstance(a, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _network_error(exc: requests.RequestException, method: str, url: str, write: bool) -> PartnerError:
    what = f"{method} {url}: {exc.__class__.__name__}"
    if isinstance(exc, (requests.Timeout, requests.ConnectionError)):
        if write and not _never_sent(exc):
            return AmbiguousWrite(f"{what}; the write may have been applied")
        return TransientError(what)
    return PermanentError(f"{what}: {exc}")


def _status_error(
    response: requests.Response, method: str, url: str, *, write: bool, conditional: bool, paging: bool
) -> PartnerError:
    status = response.status_code
    outcome = _outcome(response)
    message = f"{method} {urlsplit(url).path} answered {status} {response.reason or ''}".rstrip()
    if not outcome and response.text and not response.text.lstrip().startswith(("{", "<")):
        message += f": {response.text[:200]}"
    if status == 401:
        return AuthError(f"{message} (after refreshing credentials)", status=status, outcome=outcome)
    if status == 429 or status == 503:
        return TransientError(
            message, status=status, outcome=outcome, retry_after=parse_retry_after(response.headers.get("Retry-After"))
        )
    if status in (500, 502, 504):
        cls = AmbiguousWrite if write else TransientError
        return cls(message, status=status, outcome=outcome, retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status in (409, 412) and conditional:
        return VersionConflict(message, status=status, outcome=outcome)
    if paging and (status == 410 or (status in (400, 404) and says_search_expired(outcome))):
        return SearchExpired(message, status=status, outcome=outcome)
    if status in (404, 410):
        return NotFound(message, status=status, outcome=outcome)
    if status in (405, 501):
        return NotSupported(message, status=status, outcome=outcome)
    if 500 <= status < 600:
        return TransientError(message, status=status, outcome=outcome)
    return PermanentError(message, status=status, outcome=outcome)
