"""casebridge: case records in, FHIR R4 out, and back.

``create_app`` is the one place the service is wired: settings, database, blueprints, error
handlers, authentication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from service.config import Settings
from service.store import Store


@dataclass
class Runtime:
    settings: Settings
    store: Store


#: endpoints anyone may call without a key (besides health): what the FHIR server supports
PUBLIC = frozenset({"fhir.metadata"})


def create_app(config: Optional[dict] = None):
    from flask import Flask, g, request

    from service import audit, auth, migrations
    from service import logging as request_logging
    from service.api import audit as audit_api
    from service import fhir_index
    from service.api import body, cases, errors, fhir, health
    from service.api import partners as partners_api
    from service.sync_outbox import on_case_saved
    from service.worker import celery_init_app, default_broker_url

    settings = Settings.from_env(config)
    app = Flask(__name__, instance_relative_config=True)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["CASEBRIDGE_MAX_JSON_DEPTH"] = settings.max_json_depth
    store = Store(settings.database_url)
    if settings.extra.get("migrate", True):  # False when the caller migrated already (casebridge serve)
        migrations.upgrade(store)
    app.extensions["casebridge"] = Runtime(settings, store)
    store.add_save_hook(fhir_index.write_rows, prepare=fhir_index.rows_of_record)  # the FHIR search index
    store.add_save_hook(on_case_saved)  # the outbox: what each partner must be sent, same transaction
    celery_init_app(app, settings.broker_url or default_broker_url(settings.home))

    errors.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(cases.bp)
    app.register_blueprint(fhir.bp, url_prefix="/fhir")
    app.register_blueprint(audit_api.bp)
    app.register_blueprint(audit_api.fhir_bp, url_prefix="/fhir")
    app.register_blueprint(partners_api.bp)
    request_logging.init_app(app)  # first: times every request, even one refused by _identify
    audit.init_app(app)

    @app.before_request
    def _identify():
        g.actor = None
        if request.endpoint and not request.endpoint.startswith("health.") and request.endpoint not in PUBLIC:
            header = request.headers.get("Authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else None
            g.actor = auth.authenticate(store, token)

    app.before_request(body.check_streamed_body)  # after _identify: no body is read for an unknown caller
    return app


def runtime() -> Runtime:
    from flask import current_app
    return current_app.extensions["casebridge"]


def actor(scope: str) -> "auth.Actor":
    """The caller, who must hold ``scope``."""
    from flask import g
    from service import auth

    if g.get("actor") is None:
        raise auth.Unauthenticated("send an API key: Authorization: Bearer <key>")
    g.actor.require(scope)
    return g.actor
