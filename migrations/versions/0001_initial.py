"""Initial schema: models, vocab, runs, saes, contexts, features, examples.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

IntList = sa.ARRAY(sa.Integer)
FloatList = sa.ARRAY(sa.Float)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("source", sa.Text),
        sa.Column("n_layers", sa.Integer),
        sa.Column("d_model", sa.Integer),
        sa.Column("vocab_size", sa.Integer),
        sa.Column("bos_token_id", sa.Integer),
        sa.Column("special_token_ids", IntList),
    )
    op.create_table(
        "vocab",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("token_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("text", sa.Text),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("model_id", sa.Text),
        sa.Column("corpus", sa.Text),
        sa.Column("n_contexts", sa.Integer),
        sa.Column("context_len", sa.Integer),
        sa.Column("n_tokens", sa.BigInteger),
        sa.Column("config", sa.JSON),
        sa.Column("status", sa.Text),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("seconds", sa.Float),
    )
    op.create_table(
        "saes",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text),
        sa.Column("hook_name", sa.Text),
        sa.Column("layer", sa.Integer),
        sa.Column("site_kind", sa.Text),
        sa.Column("d_in", sa.Integer),
        sa.Column("d_sae", sa.Integer),
        sa.Column("source", sa.Text),
        sa.Column("architecture", sa.Text),
        sa.Column("l0", sa.Float),
        sa.Column("fvu", sa.Float),
        sa.Column("delta_loss", sa.Float),
        sa.Column("dead_share", sa.Float),
        sa.Column("dense_share", sa.Float),
        sa.Column("card", sa.JSON),
    )
    op.create_table(
        "contexts",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("context_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("token_ids", IntList),
    )
    op.create_table(
        "features",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("sae_id", sa.Text, primary_key=True),
        sa.Column("feature", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("n_firing", sa.BigInteger),
        sa.Column("density", sa.Float),
        sa.Column("max_act", sa.Float),
        sa.Column("mean_act", sa.Float),
        sa.Column("hist_bin_width", sa.Float),
        sa.Column("hist_counts", IntList),
        sa.Column("interval_lo", FloatList),
        sa.Column("interval_hi", FloatList),
        sa.Column("interval_share", FloatList),
        sa.Column("logit_pos_ids", IntList),
        sa.Column("logit_pos_values", FloatList),
        sa.Column("logit_neg_ids", IntList),
        sa.Column("logit_neg_values", FloatList),
        sa.Column("logit_hist_lo", sa.Float),
        sa.Column("logit_hist_hi", sa.Float),
        sa.Column("logit_hist_counts", IntList),
        sa.Column("neighbour_ids", IntList),
        sa.Column("neighbour_cos", FloatList),
    )
    op.create_table(
        "examples",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("sae_id", sa.Text, primary_key=True),
        sa.Column("feature", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("bin", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("rank", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("run_id", sa.Text),
        sa.Column("context_id", sa.Integer),
        sa.Column("max_act", sa.Float),
        sa.Column("max_pos", sa.Integer),
        sa.Column("positions", IntList),
        sa.Column("acts", FloatList),
    )


def downgrade() -> None:
    for table in ("examples", "features", "contexts", "saes", "runs", "vocab", "models"):
        op.drop_table(table)
