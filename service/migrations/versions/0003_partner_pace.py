"""The partner_pace table: a partner's request-rate limit kept for all worker processes together.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

import service.sync_store as sync_store

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sync_store.partner_pace.create(op.get_bind(), checkfirst=True)  # 0001 makes it in a new database


def downgrade() -> None:
    sync_store.partner_pace.drop(op.get_bind(), checkfirst=True)
