"""Feature labels: features.label (the text shown and searched) and features.label_kind ('auto' for
labels built by featurescope.labels.auto_label; later kinds for language-model explanations).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("features", sa.Column("label", sa.Text))
    op.add_column("features", sa.Column("label_kind", sa.Text))


def downgrade() -> None:
    op.drop_column("features", "label_kind")
    op.drop_column("features", "label")
