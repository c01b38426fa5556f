"""The DuckDB schema, the one definition both the precompute job (writer) and the server (reader) use.
Alembic migrations in migrations/ create and evolve it; `featurescope db upgrade PATH` applies them.

One database file holds one precompute run: a model, the contexts it read (stored once, shared by
every feature), and for each SAE its features. A feature's row carries everything its page shows, its
examples and cross-layer links included, so a feature page is one indexed point lookup (`feature_key`):
DuckDB decompresses a whole vector of 2,048 rows to read one row of a scan, but fetches a single row
through an index, and it serves point lookups from single-column indexes only. The views `examples`
and `links` show the nested lists as rows, for SQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The Gemma Scope report's "dense": a feature firing on more than this share of the tokens counted.
# Evaluation, the precompute job (saes.dense_share) and the explorer's filters and help all use it.
DENSE_THRESHOLD = 0.1

IntList = sa.ARRAY(sa.Integer)
FloatList = sa.ARRAY(sa.Float)  # DuckDB FLOAT is float32: stored activations equal the fp32 computation


class DuckDBType(sa.types.UserDefinedType):
    """A column type written as DuckDB spells it (duckdb_engine cannot compile a list of structs)."""
    cache_ok = True

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def get_col_spec(self, **kw) -> str:
        return self.spec


# One element per example: the top examples (kind 'top', bin 0) by rank, then the interval samples
# (kind 'interval', bin = interval index) by bin and rank. positions/acts: the context's tokens where this
# feature's activation is > 0, and those activations.
EXAMPLE_LIST = DuckDBType("STRUCT(kind VARCHAR, bin INTEGER, rank INTEGER, context_id INTEGER, max_act FLOAT, "
                          "max_pos INTEGER, positions INTEGER[], acts FLOAT[])[]")
# One element per neighbouring SAE (previous/next layer with an SAE, or the same layer) with at least one
# link, by other_sae_id (see precompute/links.py and the `links` view below).
LINK_LIST = DuckDBType("STRUCT(other_sae_id VARCHAR, direction VARCHAR, other_features INTEGER[], coact FLOAT[], "
                       "coact_rel FLOAT[], cosine FLOAT[])[]")
SAE_NUMBER_SHIFT = 32


def feature_key(sae_number: int, feature: int) -> int:
    """features.feature_key: the SAE's number in its file and the feature index as one indexed BIGINT."""
    return (sae_number << SAE_NUMBER_SHIFT) + feature


def _key(type_=sa.Text) -> Mapped:
    return mapped_column(type_, primary_key=True, autoincrement=False)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = _key()  # URL id, e.g. "gemma-2-2b", "smollm2-135m"
    source: Mapped[str] = mapped_column(sa.Text)  # hub id, folder, gguf file or embedded short name
    n_layers: Mapped[int] = mapped_column(sa.Integer)
    d_model: Mapped[int] = mapped_column(sa.Integer)
    vocab_size: Mapped[int] = mapped_column(sa.Integer)
    bos_token_id: Mapped[int] = mapped_column(sa.Integer)
    special_token_ids = mapped_column(IntList)


class Vocab(Base):
    """Display text of every token, so pages render without loading a tokenizer."""
    __tablename__ = "vocab"
    model_id: Mapped[str] = _key()
    token_id: Mapped[int] = _key(sa.Integer)
    text: Mapped[str] = mapped_column(sa.Text)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = _key()  # hash of the run's config: the same command resumes the same run
    model_id: Mapped[str] = mapped_column(sa.Text)
    corpus: Mapped[str] = mapped_column(sa.Text)
    n_contexts: Mapped[int] = mapped_column(sa.Integer)
    context_len: Mapped[int] = mapped_column(sa.Integer)
    n_tokens: Mapped[int] = mapped_column(sa.BigInteger)  # content tokens (BOS/EOS/pad excluded)
    config = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.Text)  # "complete" once published
    started_at = mapped_column(sa.DateTime)
    finished_at = mapped_column(sa.DateTime)
    seconds: Mapped[float] = mapped_column(sa.Float)


class SAE(Base):
    __tablename__ = "saes"
    model_id: Mapped[str] = _key()
    id: Mapped[str] = _key()  # URL id, e.g. "20-res-16k"
    run_id: Mapped[str] = mapped_column(sa.Text)
    hook_name: Mapped[str] = mapped_column(sa.Text)  # blocks.20.hook_resid_post
    layer: Mapped[int] = mapped_column(sa.Integer)
    site_kind: Mapped[str] = mapped_column(sa.Text)  # res | mlp | att
    d_in: Mapped[int] = mapped_column(sa.Integer)
    d_sae: Mapped[int] = mapped_column(sa.Integer)
    source: Mapped[str] = mapped_column(sa.Text)  # what load_sae() read it from
    architecture: Mapped[str] = mapped_column(sa.Text)
    # Quality as the Gemma Scope report measures it; NULL when not evaluated.
    l0 = mapped_column(sa.Float)
    fvu = mapped_column(sa.Float)
    delta_loss = mapped_column(sa.Float)
    dead_share = mapped_column(sa.Float)  # of this run: features that never fired
    dense_share = mapped_column(sa.Float)  # of this run: features denser than DENSE_THRESHOLD
    card = mapped_column(sa.JSON)
    number: Mapped[int] = mapped_column(sa.Integer)  # 0, 1, ... within the file: the high half of feature_key


class Context(Base):
    __tablename__ = "contexts"
    run_id: Mapped[str] = _key()
    context_id: Mapped[int] = _key(sa.Integer)
    token_ids = mapped_column(IntList)  # BOS first
    # False: cut from the middle of a document, its warm-up positions did not count (featurescope/positions.py);
    # NULL in files from before schema 0005, whose runs counted every position after BOS
    starts_document = mapped_column(sa.Boolean)


class Feature(Base):
    __tablename__ = "features"
    model_id: Mapped[str] = _key()
    sae_id: Mapped[str] = _key()
    feature: Mapped[int] = _key(sa.Integer)
    n_firing: Mapped[int] = mapped_column(sa.BigInteger)  # content tokens where act > 0
    density: Mapped[float] = mapped_column(sa.Float)  # n_firing / run's content tokens
    max_act: Mapped[float] = mapped_column(sa.Float)
    mean_act: Mapped[float] = mapped_column(sa.Float)  # over firing tokens
    # Histogram of non-zero activations: bin i covers [i * width, (i + 1) * width).
    hist_bin_width: Mapped[float] = mapped_column(sa.Float)
    hist_counts = mapped_column(IntList)
    # Interval samples: equal-width activation ranges [lo, hi); share = fraction of firing tokens in it.
    interval_lo = mapped_column(FloatList)
    interval_hi = mapped_column(FloatList)
    interval_share = mapped_column(FloatList)
    # Logit effect: W_dec[feature] @ W_U.
    logit_pos_ids = mapped_column(IntList)
    logit_pos_values = mapped_column(FloatList)
    logit_neg_ids = mapped_column(IntList)
    logit_neg_values = mapped_column(FloatList)
    logit_hist_lo: Mapped[float] = mapped_column(sa.Float)
    logit_hist_hi: Mapped[float] = mapped_column(sa.Float)
    logit_hist_counts = mapped_column(IntList)
    # Nearest features of the same SAE by decoder cosine similarity.
    neighbour_ids = mapped_column(IntList)
    neighbour_cos = mapped_column(FloatList)
    # Label shown on pages and searched; label_kind says who made it ("auto": featurescope.labels.auto_label).
    label = mapped_column(sa.Text)
    label_kind = mapped_column(sa.Text)
    feature_key: Mapped[int] = mapped_column(sa.BigInteger)  # feature_key(sae number, feature), uniquely indexed
    examples = mapped_column(EXAMPLE_LIST)  # [] when the feature never fired
    links = mapped_column(LINK_LIST)  # [] when the run computed no links for it
    peak_token_ids = mapped_column(IntList)  # the token at each top example's maximum, strongest first


class Example(Base):
    """The view `examples` (read-only): one row per element of features.examples, with the run's id."""
    __tablename__ = "examples"
    model_id: Mapped[str] = _key()
    sae_id: Mapped[str] = _key()
    feature: Mapped[int] = _key(sa.Integer)
    kind: Mapped[str] = _key()  # "top" | "interval"
    bin: Mapped[int] = _key(sa.Integer)  # interval index (0 for top examples)
    rank: Mapped[int] = _key(sa.Integer)  # 0 = strongest within (kind, bin)
    run_id: Mapped[str] = mapped_column(sa.Text)
    context_id: Mapped[int] = mapped_column(sa.Integer)
    max_act: Mapped[float] = mapped_column(sa.Float)
    max_pos: Mapped[int] = mapped_column(sa.Integer)  # position of max_act in the context (0 = BOS)
    # Sparse per-token activations of this feature over the context: positions with act > 0.
    positions = mapped_column(IntList)
    acts = mapped_column(FloatList)


class Link(Base):
    """The view `links` (read-only): one row per element of features.links, the features of a
    neighbouring SAE linked to one feature (precompute/links.py): co-activation links first (by
    coact_rel), then weight-only ones."""
    __tablename__ = "links"
    model_id: Mapped[str] = _key()
    sae_id: Mapped[str] = _key()
    feature: Mapped[int] = _key(sa.Integer)
    other_sae_id: Mapped[str] = _key()
    direction: Mapped[str] = mapped_column(sa.Text)  # "up" | "down" | "same": where the other SAE's site lies
    other_features = mapped_column(IntList)
    # Mean activation of each linked feature over this feature's top-example max positions, and the score
    # that ranks co-activation links: (coact - its mean over all tokens) / its max activation.
    coact = mapped_column(FloatList)
    coact_rel = mapped_column(FloatList)
    # Cosine of this decoder direction with the other's encoder direction (other downstream), or of this
    # encoder direction with the other's decoder direction (upstream); NULL unless both sites are residual.
    cosine = mapped_column(FloatList)


metadata = Base.metadata
