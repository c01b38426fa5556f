"""One row per feature: a feature's examples and cross-layer links move into its features row
(features.examples, features.links, and features.peak_token_ids: the token at each top example's
maximum), which gets a single-column key, features.feature_key =
saes.number * 2**32 + feature, with a unique index. A feature page becomes one indexed point lookup;
the tables examples and links become views over the nested lists, so SQL over them keeps working.

Existing rows are carried over (`featurescope db upgrade PATH` upgrades a published file in place).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EXAMPLE_LIST = ("STRUCT(kind VARCHAR, bin INTEGER, rank INTEGER, context_id INTEGER, max_act FLOAT, max_pos INTEGER, "
                "positions INTEGER[], acts FLOAT[])[]")
LINK_LIST = "STRUCT(other_sae_id VARCHAR, direction VARCHAR, other_features INTEGER[], coact FLOAT[], coact_rel FLOAT[], cosine FLOAT[])[]"

EXAMPLES_VIEW = """
CREATE VIEW examples AS
SELECT model_id, sae_id, feature, e.kind, e.bin, e.rank, run_id, e.context_id, e.max_act, e.max_pos, e.positions, e.acts
FROM (SELECT f.model_id, f.sae_id, f.feature, s.run_id, unnest(f.examples) AS e
      FROM features f JOIN saes s ON s.model_id = f.model_id AND s.id = f.sae_id)
"""
LINKS_VIEW = """
CREATE VIEW links AS
SELECT model_id, sae_id, feature, l.other_sae_id, l.direction, l.other_features, l.coact, l.coact_rel, l.cosine
FROM (SELECT model_id, sae_id, feature, unnest(links) AS l FROM features)
"""


def upgrade() -> None:
    op.execute("ALTER TABLE saes ADD COLUMN number INTEGER")
    op.execute("UPDATE saes SET number = n.number FROM (SELECT model_id, id, (row_number() OVER (ORDER BY model_id, id) - 1)::INTEGER "
               "AS number FROM saes) n WHERE saes.model_id = n.model_id AND saes.id = n.id")
    op.execute("ALTER TABLE features ADD COLUMN feature_key BIGINT")
    op.execute(f"ALTER TABLE features ADD COLUMN examples {EXAMPLE_LIST}")
    op.execute(f"ALTER TABLE features ADD COLUMN links {LINK_LIST}")
    op.execute("ALTER TABLE features ADD COLUMN peak_token_ids INTEGER[]")
    op.execute("""
UPDATE features SET feature_key = p.feature_key, examples = coalesce(p.examples, []), links = coalesce(p.links, []),
                    peak_token_ids = coalesce(p.peak_token_ids, [])
FROM (SELECT f.model_id, f.sae_id, f.feature, s.number::BIGINT * 4294967296 + f.feature AS feature_key, ex.examples,
             ex.peak_token_ids, li.links
      FROM features f JOIN saes s ON s.model_id = f.model_id AND s.id = f.sae_id
      LEFT JOIN (SELECT e.model_id, e.sae_id, e.feature,
                        list(struct_pack(kind := e.kind, bin := e.bin, rank := e.rank, context_id := e.context_id, max_act := e.max_act,
                                      max_pos := e.max_pos, positions := e.positions, acts := e.acts)
                             ORDER BY e.kind <> 'top', e.bin, e.rank) AS examples,
                        list(c.token_ids[e.max_pos + 1] ORDER BY e.rank) FILTER (WHERE e.kind = 'top') AS peak_token_ids
                 FROM examples e JOIN contexts c ON c.run_id = e.run_id AND c.context_id = e.context_id
                 GROUP BY ALL) ex ON ex.model_id = f.model_id AND ex.sae_id = f.sae_id AND ex.feature = f.feature
      LEFT JOIN (SELECT model_id, sae_id, feature, list(struct_pack(other_sae_id, direction, other_features, coact, coact_rel, cosine)
                                                         ORDER BY other_sae_id) AS links
                 FROM links GROUP BY ALL) li ON li.model_id = f.model_id AND li.sae_id = f.sae_id AND li.feature = f.feature) p
WHERE features.model_id = p.model_id AND features.sae_id = p.sae_id AND features.feature = p.feature""")
    op.drop_table("examples")
    op.drop_table("links")
    op.execute(EXAMPLES_VIEW)
    op.execute(LINKS_VIEW)
    op.create_index("ix_features_feature_key", "features", ["feature_key"], unique=True)


def downgrade() -> None:
    # DuckDB cannot drop an indexed column in the transaction that drops its index: rebuild the table instead.
    op.execute("CREATE TEMP TABLE old_examples AS SELECT * FROM examples")
    op.execute("CREATE TEMP TABLE old_links AS SELECT * FROM links")
    op.execute("CREATE TEMP TABLE old_features AS SELECT * EXCLUDE (feature_key, examples, links, peak_token_ids) FROM features")
    op.execute("DROP VIEW examples")
    op.execute("DROP VIEW links")
    op.drop_table("features")
    ints, floats = sa.ARRAY(sa.Integer), sa.ARRAY(sa.Float)
    op.create_table(
        "features",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("sae_id", sa.Text, primary_key=True),
        sa.Column("feature", sa.Integer, primary_key=True, autoincrement=False),
        *[sa.Column(name, type_) for name, type_ in [
            ("n_firing", sa.BigInteger), ("density", sa.Float), ("max_act", sa.Float), ("mean_act", sa.Float),
            ("hist_bin_width", sa.Float), ("hist_counts", ints), ("interval_lo", floats), ("interval_hi", floats),
            ("interval_share", floats), ("logit_pos_ids", ints), ("logit_pos_values", floats), ("logit_neg_ids", ints),
            ("logit_neg_values", floats), ("logit_hist_lo", sa.Float), ("logit_hist_hi", sa.Float),
            ("logit_hist_counts", ints), ("neighbour_ids", ints), ("neighbour_cos", floats), ("label", sa.Text),
            ("label_kind", sa.Text)]],
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
        sa.Column("positions", ints),
        sa.Column("acts", floats),
    )
    op.create_table(
        "links",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("sae_id", sa.Text, primary_key=True),
        sa.Column("feature", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("other_sae_id", sa.Text, primary_key=True),
        sa.Column("direction", sa.Text),
        sa.Column("other_features", ints),
        sa.Column("coact", floats),
        sa.Column("coact_rel", floats),
        sa.Column("cosine", floats),
    )
    op.execute("INSERT INTO features SELECT * FROM old_features ORDER BY model_id, sae_id, feature")
    op.execute("INSERT INTO examples SELECT * FROM old_examples ORDER BY model_id, sae_id, feature, kind DESC, bin, rank")
    op.execute("INSERT INTO links SELECT * FROM old_links ORDER BY model_id, sae_id, feature, other_sae_id")
    for table in ("old_features", "old_examples", "old_links"):
        op.execute(f"DROP TABLE {table}")
    op.drop_column("saes", "number")
