"""One settings object, read from CASEBRIDGE_* environment variables, with local defaults that need
nothing installed: SQLite in the instance folder and an embedded broker."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("CASEBRIDGE_HOME") or Path.cwd() / "instance")


@dataclass
class Settings:
    #: '' = SQLite in the home folder
    database_url: str = ""
    #: largest request body accepted, in bytes (413 past it)
    max_body_bytes: int = 5 * 1024 * 1024
    #: deepest JSON nesting accepted (400 past it)
    max_json_depth: int = 64
    #: page size for lists and searches when the client names none, and the most it may ask for
    page_size: int = 50
    max_page_size: int = 500
    #: the URL partners see, for fullUrls and Location headers ('' = worked out from each request)
    base_url: str = ""
    #: the Celery broker ('' = the embedded one: SQLAlchemy over SQLite in the home folder)
    broker_url: str = ""
    #: where the embedded database, broker and secret key live
    home: Path = field(default_factory=default_home)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, overrides: dict | None = None) -> "Settings":
        values: dict = {}
        for f in fields(cls):
            env = os.environ.get(f"CASEBRIDGE_{f.name.upper()}")
            if env is not None and f.name != "extra":
                if isinstance(f.default, bool) or f.name == "extra":
                    continue
                values[f.name] = (int(env) if isinstance(f.default, int) else Path(env) if f.name == "home" else env)
        settings = cls(**values)
        for key, value in (overrides or {}).items():
            if hasattr(settings, key):
                setattr(settings, key, value)
            else:
                settings.extra[key] = value
        settings.home = Path(settings.home)
        if not settings.database_url:
            settings.home.mkdir(parents=True, exist_ok=True)
            settings.database_url = f"sqlite:///{settings.home / 'casebridge.db'}"
        if not settings.broker_url:
            settings.home.mkdir(parents=True, exist_ok=True)
        return settings
