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


def create_app(config: Optional[dict] = None):
    from flask import Flask, g, request

    from service import auth, migrations
    from service.api import cases, errors, fhir, health

    settings = Settings.from_env(config)
    app = Flask(__name__, instance_relative_config=True)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["CASEBRIDGE_MAX_JSON_DEPTH"] = settings.max_json_depth
    store = Store(settings.database_url)
    migrations.upgrade(store)
    app.extensions["casebridge"] = Runtime(settings, store)

    errors.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(cases.bp)
    app.register_blueprint(fhir.bp, url_prefix="/fhir")

    @app.before_request
    def _identify():
        g.actor = None
        if request.endpoint and not request.endpoint.startswith("health."):
            header = request.headers.get("Authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else None
            g.actor = auth.authenticate(store, token)

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
