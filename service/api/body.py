"""Reading request bodies safely: the right content type (415), a size limit (413, enforced by the
app's MAX_CONTENT_LENGTH), JSON that parses and is not nested deeper than the configured limit (400)."""
from __future__ import annotations

from typing import Any, Iterable

import orjson
from flask import current_app, request
from werkzeug.exceptions import UnsupportedMediaType

from service.errors import Invalid, Problem

JSON_TYPES = ("application/json", "application/merge-patch+json", "application/fhir+json")


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
