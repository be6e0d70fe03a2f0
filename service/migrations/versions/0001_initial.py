"""The initial schema (regenerated from service.store while the schema settles before the first release).

Revision ID: 0001
Revises:
"""
from alembic import op

from service.store import metadata
import service.sync_store  # noqa: F401  (its tables are part of the schema)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
