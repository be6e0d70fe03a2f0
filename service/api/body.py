"""Reading request bodies safely: the right content type (415), a size limit (413, enforced by the
app's MAX_CONTENT_LENGTH, and by ``check_streamed_body`` for a body without Content-Length), JSON
that parses and is not nested deeper than the configured limit (400)."""
from __future__ import annotations

from typing import Any, Iterable

import orjson
from flask import current_app, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, UnsupportedMediaType

from service.errors import Invalid, Problem

JSON_TYPES = ("application/json", "application/merge-patch+json", "application/fhir+json")


def check_streamed_body() -> None:
    """Before each request: a body sent without Content-Length (chunked), which the server (gunicorn)
    hands on as a stream it ends itself, is read here (and kept for the view): 400 when its encoding
    is broken, 413 when it goes on past the limit. Werkzeug reads such a stream only up to
    MAX_CONTENT_LENGTH and hands on what it read, so a body past the limit would be cut short instead:
    JSON padded with spaces, or NDJSON cut at a line's end, would be taken as sent (an import of only
    part of the lines)."""
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        return  # with a Content-Length, Werkzeug refuses a body past the limit before reading it
    limit = request.max_content_length
    try:
        body = request.get_data(cache=True)
        past_the_limit = limit is not None and len(body) >= limit and request.environ["wsgi.input"].read(1)
    except HTTPException:
        raise
    except Exception as error:  # noqa: BLE001 - the server's own (gunicorn's ParseException): a bad chunk, a cut stream
        raise BadRequest("the request body could not be read: its chunked encoding is broken") from error
    if past_the_limit:
        raise RequestEntityTooLarge()


def read_json(accepted: Iterable[str] = JSON_TYPES) -> Any:
    mimetype = request.mimetype or ""
    if mimetype not in accepted:
        raise UnsupportedMediaType(f"send {' or '.join(accepted)}, not {mimetype or 'no content type'}")
    raw = request.get_data(cache=True)
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise Invalid("the body is not valid JSON", [Problem("", f"not valid JSON: {error}")]) from None
    limit = current_app.config.get("CASEBRIDGE_MAX_JSON_DEPTH", 64)
    if _depth(data, limit) > limit:
        raise Invalid("the body is nested too deeply", [Problem("", f"JSON nested deeper than {limit} levels")])
    return data


def _depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests, stopping once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if type(item) is dict:
            stack.extend((v, depth + 1) for v in item.values() if type(v) in (dict, list))
        elif type(item) is list:
            stack.extend((v, depth + 1) for v in item if type(v) in (dict, list))
    return deepest
