"""Logging without client data.

A request is logged as one line: method, the route's path template (``/cases/<case_id>``, never the
path itself or its query string), status, duration and the API key's id — never a body, a header or a
query value. Nothing else in casebridge logs request contents either; an error is logged by its type.
An exception is logged by :func:`describe_exception`: its type and its frames (file, line, function),
never its message, notes or locals, which can quote client data (``ValueError("bad date 'Okafor'")``).

:func:`init_app` adds the request log to an app; :func:`configure` sends casebridge's logs to standard
error, for ``casebridge serve`` (libraries and tests keep their own logging setup), with
:class:`WithoutClientData` on them and :class:`GunicornErrorLog` on gunicorn's error log.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
import warnings
from typing import Optional

REQUEST_LOGGER = "casebridge.request"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(REQUEST_LOGGER)


def init_app(app) -> None:
    """Time each request and log it when answered. Call before any other ``before_request`` hook,
    so a request refused by one of them (a 401) is still timed."""
    from flask import g, request

    @app.before_request
    def _start_timer():
        g.casebridge_started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        try:
            started = g.get("casebridge_started")
            elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
            rule = request.url_rule.rule if request.url_rule is not None else "<no route>"
            actor = g.get("actor")
            key_id = actor.key_id if actor is not None else "-"
            fields = {"http_method": request.method, "route": rule, "status": response.status_code,
                      "duration_ms": round(elapsed_ms, 1), "key_id": key_id}
            log.info("%s %s %s %.1fms key=%s", request.method, rule, response.status_code, elapsed_ms, key_id,
                     extra=fields)
        except Exception as error:  # noqa: BLE001 - logging must never break the response
            logging.getLogger("casebridge").error("could not log the request: %s", type(error).__name__)
        return response


def describe_exception(error: BaseException) -> str:
    """``error`` as a traceback without its message: each frame's file, line and function, then the
    exception's type, and the same for the exceptions it was raised from or while handling. What an
    operator needs to find the fault, and nothing from the data that met it."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: Optional[BaseException] = error
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    blocks = []
    for exception, link_below in reversed(chain):  # the first cause first, as Python prints them
        lines = ["Traceback (most recent call last):"] if exception.__traceback__ is not None else []
        lines += [f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}'
                  for frame, lineno in traceback.walk_tb(exception.__traceback__)]
        lines.append(f"{_type_name(type(exception))} (message withheld)")
        blocks.append("\n".join(lines))
        if link_below:
            blocks.append(link_below)
    return "\n\n".join(blocks)


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


class WithoutClientData(logging.Filter):
    """Makes each record it sees safe to write: an exception attached to it (``log.exception``) is
    replaced by :func:`describe_exception` in the message, and an exception among its arguments by its
    type's name. On a handler it covers every logger whose records reach the handler; on a logger, only
    records made by that very logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_type_name(type(a)) if isinstance(a, BaseException) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _type_name(type(a)) if isinstance(a, BaseException) else a
                           for k, a in record.args.items()}
        if record.exc_info:
            error = record.exc_info[1]
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - arguments that do not fit: a filter must not raise
                message = str(record.msg)
            if error is not None:
                message = f"{message}\n{describe_exception(error)}"
            record.msg, record.args = message, None
            record.exc_info, record.exc_text = None, None
        return True


class GunicornErrorLog(WithoutClientData):
    """For gunicorn's error log: a request gunicorn cannot parse is logged as ``Invalid request from
    ip=...: Invalid HTTP request line`` without the line, header or method it quotes (which carry query
    strings and header values), a failed request without its URI, and the debug line gunicorn's default
    ``pre_request`` hook writes (method and path) not at all: casebridge logs each request itself."""

    INVALID = "Invalid request from ip="
    FAILED = "Error handling request"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message == "%s %s" and record.levelno == logging.DEBUG and _is_method_and_path(record.args):
            return False
        if message.startswith(self.INVALID):
            ip, _, error = message[len(self.INVALID):].partition(": ")
            record.msg, record.args = self.INVALID + "%s: %s", (ip, _error_kind(error))
        elif message.startswith(self.FAILED):
            record.msg, record.args = self.FAILED, None
        return super().filter(record)


def _is_method_and_path(args) -> bool:
    return (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str) and args[0].isalpha()
            and isinstance(args[1], str) and args[1].startswith("/"))


def _error_kind(error: str) -> str:
    """``Invalid HTTP request line`` of ``Invalid HTTP request line: 'GET /cases?name=... HTTP/1.1'``."""
    kind = error.split(": ", 1)[0]
    for quote in ("'", '"'):
        kind = kind.split(quote, 1)[0]
    return kind.strip() or "unreadable request"


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a library's, a validator's), by category and place: their text may quote data."""
    logging.getLogger("casebridge.warnings").warning("%s at %s:%s (message withheld)", _type_name(category),
                                                     filename, lineno)


def configure(level: Optional[str] = None) -> None:
    """Send casebridge's logs (and warnings from the libraries) to standard error, once, without client
    data: exceptions by type and frames, warnings by category and place, gunicorn's error log filtered
    (configure before gunicorn starts: its workers inherit the filter)."""
    root = logging.getLogger("casebridge")
    if any(getattr(h, "_casebridge", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(WithoutClientData())
    handler._casebridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel((level or "INFO").upper())
    root.propagate = False
    # libraries that could echo statements, parameters or URLs at lower levels stay at WARNING
    for name in ("sqlalchemy", "urllib3", "werkzeug", "celery", "kombu"):
        logging.getLogger(name).setLevel(logging.WARNING)
    gunicorn_log = logging.getLogger("gunicorn.error")
    if not any(isinstance(f, GunicornErrorLog) for f in gunicorn_log.filters):
        gunicorn_log.addFilter(GunicornErrorLog())  # gunicorn replaces its handlers, never the logger's filters
    warnings.showwarning = _log_warning
