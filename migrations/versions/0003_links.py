"""Cross-layer links: table links, one row per (SAE, feature, neighbour SAE) with the linked features of
the neighbour and their co-activation (raw and relative) and decoder/encoder cosine (precompute/links.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "links",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("sae_id", sa.Text, primary_key=True),
        sa.Column("feature", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("other_sae_id", sa.Text, primary_key=True),
        sa.Column("direction", sa.Text),
        sa.Column("other_features", sa.ARRAY(sa.Integer)),
        sa.Column("coact", sa.ARRAY(sa.Float)),
        sa.Column("coact_rel", sa.ARRAY(sa.Float)),
        sa.Column("cosine", sa.ARRAY(sa.Float)),
    )


def downgrade() -> None:
    op.drop_table("links")
