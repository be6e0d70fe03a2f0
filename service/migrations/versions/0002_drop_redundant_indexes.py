"""Drop two indexes that a wider one already covers, so a case save writes fewer index pages.

``ix_cases_organization_id`` is a prefix of ``ix_cases_org_updated``; nothing looks a resource up by
patient without its organization and type (``ix_fhir_resources_search``).

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_DROPPED = {
    "ix_cases_organization_id": ("cases", ["organization_id"]),
    "ix_fhir_resources_patient_id": ("fhir_resources", ["patient_id"]),
}


def upgrade() -> None:
    for name in _DROPPED:
        op.execute(f"DROP INDEX IF EXISTS {name}")  # a database made by 0001 after this change has none


def downgrade() -> None:
    for name, (table, columns) in _DROPPED.items():
        op.create_index(name, table, columns)
