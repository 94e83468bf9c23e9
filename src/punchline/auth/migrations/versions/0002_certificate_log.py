"""Log of issued certificates; when an account was disabled; display names.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("roles", sa.String(64), nullable=False),
        sa.Column("key_fingerprint", sa.String(80), nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("not_after", sa.Float, nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
    )
    op.create_index("ix_certificates_subject", "certificates", ["subject"])
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("disabled_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("display_name", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("display_name")
        batch.drop_column("disabled_at")
    op.drop_index("ix_certificates_subject", "certificates")
    op.drop_table("certificates")
