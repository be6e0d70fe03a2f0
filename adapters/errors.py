"""What can go wrong when talking to a partner, sorted by what the caller should do about it.

``TransientError``  -> retry later (the Celery task waits; ``retry_after`` says how long, when known).
``AmbiguousWrite``  -> a write was sent but its answer was lost: look for the resource before retrying,
                       because a blind retry of a POST creates a duplicate.
``AuthError``       -> credentials are wrong or revoked; a refresh and one retry already failed.
``PermanentError``  -> the partner refused the request; retrying the same request cannot help.
``VersionConflict`` -> a conditional update (If-Match) lost a race: re-read, merge, try again.
``SearchExpired``   -> a paged search's session is gone: start the search over.

Every error carries the HTTP ``status`` (when there was one) and the partner's ``OperationOutcome``
(a dict, when the partner sent one), so a dead-letter record shows exactly what the partner said.
"""
from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any


class PartnerError(Exception):
    """Base of every error an adapter raises."""

    def __init__(
        self,
        *args: Any,
        status: int | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> None:
        """``Error("message", status=422, outcome={...})``, or status first: ``Error(422, outcome, "message")``."""
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            status = args[0]
            outcome = args[1] if len(args) > 1 else outcome
            message = str(args[2]) if len(args) > 2 else (outcome_text(outcome) or f"HTTP {status}")
        elif len(args) == 1:
            message = str(args[0])
        else:
            raise TypeError("expected (message) or (status, outcome, message)")
        super().__init__(message)
        self.message = message
        self.status = status
        self.outcome = dict(outcome) if outcome else None

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        detail = outcome_text(self.outcome)
        if detail and detail not in self.message:
            return f"{prefix}{self.message} ({detail})"
        return f"{prefix}{self.message}"


class TransientError(PartnerError):
    """Worth retrying later: connection error, timeout, 429, 502, 503, 504."""

    def __init__(
        self,
        *args: Any,
        status: int | None = None,
        outcome: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(*args, status=status, outcome=outcome)
        self.retry_after = retry_after


class AmbiguousWrite(TransientError):
    """A write was sent and its answer was lost (read timeout, connection reset after sending).

    The partner may or may not have applied it. Before retrying, look for the resource (by identifier,
    or read it back and compare versions); a retried POST on a partner without conditional create makes
    a duplicate.
    """


class AuthError(PartnerError):
    """401 after a token refresh and one retry, or the token endpoint refused the client."""


class PermanentError(PartnerError):
    """The partner refused the request (400, 403, 404, 405, 409, 410, 412, 422, ...); do not retry."""


class NotFound(PermanentError):
    """404 or 410 on a read: the resource is not there (or no longer)."""


class NotSupported(PermanentError):
    """The partner does not offer this interaction (405, or its capabilities say no)."""


class VersionConflict(PermanentError):
    """409 or 412 on a conditional update: someone else changed the resource first."""


class SearchExpired(PermanentError):
    """The partner dropped a paged search's session (410, or 400/404 saying the search expired)."""


# --- helpers shared by the implementations -------------------------------------------------------


def outcome_text(outcome: Mapping[str, Any] | None) -> str:
    """The human-readable part of an OperationOutcome: diagnostics and details texts, joined."""
    if not outcome:
        return ""
    parts: list[str] = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        for text in (issue.get("diagnostics"), (issue.get("details") or {}).get("text")):
            if text and text not in parts:
                parts.append(str(text))
    return "; ".join(parts)


def outcome_codes(outcome: Mapping[str, Any] | None) -> set[str]:
    """The issue codes of an OperationOutcome (``not-found``, ``conflict``, ``expired``, ...)."""
    if not outcome:
        return set()
    return {
        str(issue["code"])
        for issue in outcome.get("issue") or []
        if isinstance(issue, Mapping) and issue.get("code")
    }


def make_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome, as the in-memory endpoint answers."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


_EXPIRED_WORDS = re.compile(
    r"expired|expire[sd]?\b|session|no longer (valid|available|exists?)|may have expired|unknown (search|page)",
    re.IGNORECASE,
)


def says_search_expired(outcome: Mapping[str, Any] | None) -> bool:
    """Whether an OperationOutcome on a 400/404 paging answer means "your search session is gone"."""
    return "expired" in outcome_codes(outcome) or bool(_EXPIRED_WORDS.search(outcome_text(outcome)))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date; ``None`` if unusable.

    A date in the past means "now" (0.0). ``now`` is a Unix timestamp, for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": no zone given; HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
