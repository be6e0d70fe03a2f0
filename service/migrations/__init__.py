"""Alembic migrations of the casebridge database; ``upgrade`` brings a database to the newest schema."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent


def config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(store) -> None:
    with store.engine.begin() as conn:
        cfg = config(store.url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
