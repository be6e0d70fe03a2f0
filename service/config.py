"""One settings object, read from CASEBRIDGE_* environment variables, with local defaults that need
nothing installed: SQLite in the instance folder and an embedded broker."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("CASEBRIDGE_HOME", Path.cwd() / "instance"))


@dataclass
class Settings:
    database_url: str = f"sqlite:///{DEFAULT_HOME / 'casebridge.db'}"
    #: largest request body accepted, in bytes (413 past it)
    max_body_bytes: int = 5 * 1024 * 1024
    #: deepest JSON nesting accepted (400 past it)
    max_json_depth: int = 64
    #: page size for lists and searches when the client names none, and the most it may ask for
    page_size: int = 50
    max_page_size: int = 500
    #: the URL partners see, for fullUrls and Location headers ('' = worked out from each request)
    base_url: str = ""
    broker_url: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, overrides: dict | None = None) -> "Settings":
        values: dict = {}
        for f in fields(cls):
            env = os.environ.get(f"CASEBRIDGE_{f.name.upper()}")
            if env is not None and f.name != "extra":
                values[f.name] = int(env) if f.type == "int" or isinstance(f.default, int) else env
        settings = cls(**values)
        for key, value in (overrides or {}).items():
            if hasattr(settings, key):
                setattr(settings, key, value)
            else:
                settings.extra[key] = value
        return settings
