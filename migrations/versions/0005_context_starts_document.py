"""Which contexts start a document: contexts.starts_document. A context cut from the middle of a document
does not count its first positions after BOS (the warm-up, featurescope/positions.py); pages grey them out
and live encoding of the context leaves out the same positions.

Rows of older files stay NULL (not known): their runs counted every position after BOS, and pages show
them so (`featurescope db upgrade PATH` upgrades a published file in place).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("contexts", sa.Column("starts_document", sa.Boolean))


def downgrade() -> None:
    op.drop_column("contexts", "starts_document")
