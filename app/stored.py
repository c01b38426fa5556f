"""What the pages read from a published file besides a feature's own row, loaded once per file
(DataFile.cached): token texts, stored contexts, every feature's label, density and maximum, the run's
config; and the small lookups several views share (peak tokens, labels of rows written without one).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from featurescope.app.catalog import ModelInfo, SAEInfo
from featurescope.app.twin_models import TokenCount
from featurescope.labels import LABEL_KIND_AUTO, auto_label
from featurescope.schema import Context, Feature, Run, Vocab, feature_key

PEAK_TOKENS_SHOWN = 3


# ------------------------------------------------------------------------------------------------- vocab
class TokenTexts:
    """Display text of every token of a model, loaded once per file. `derived` lets other layers memoise
    what they compute from it (e.g. app/token_html.py's whitespace-visible forms)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.derived: dict[str, Any] = {}
        self._by_stripped: dict[str, list[int]] | None = None
        self._by_text: dict[str, list[int]] | None = None

    def __getitem__(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else f"<unk {token_id}>"

    def many(self, token_ids: list[int]) -> list[str]:
        texts = self.texts
        try:
            return [texts[t] for t in token_ids] if min(token_ids, default=0) >= 0 else [self[t] for t in token_ids]
        except IndexError:
            return [self[t] for t in token_ids]

    def ids_for(self, text: str) -> list[int]:
        """Tokens whose text is `text`; a query without surrounding whitespace (" Paris" typed as "Paris")
        also matches tokens that differ from it only in surrounding whitespace."""
        if self._by_text is None:
            by_text: dict[str, list[int]] = {}
            by_stripped: dict[str, list[int]] = {}
            for i, t in enumerate(self.texts):
                by_text.setdefault(t, []).append(i)
                by_stripped.setdefault(t.strip(), []).append(i)
            self._by_text, self._by_stripped = by_text, by_stripped
        if text != text.strip() or not text.strip():
            return list(self._by_text.get(text, []))
        return sorted(set(self._by_text.get(text, [])) | set(self._by_stripped.get(text, [])))


def token_texts(model: ModelInfo) -> TokenTexts:
    def build() -> TokenTexts:
        with model.file.connect() as conn:
            rows = conn.execute(sa.select(Vocab.token_id, Vocab.text).where(Vocab.model_id == model.id)).all()
        texts = [""] * max(model.vocab_size, max((r[0] for r in rows), default=-1) + 1)
        for token_id, text in rows:
            texts[token_id] = text
        return TokenTexts(texts)

    return model.file.cached(("vocab", model.id), build)


class TokenStrings(Sequence[str]):
    """The texts of a token id sequence, looked up when read: a feature page holds thousands of example
    tokens, which the HTML page renders from their ids and only the JSON twin writes out as text
    (app/responses.py serialises this as a list)."""
    __slots__ = ("_vocab", "_ids")

    def __init__(self, vocab: TokenTexts, token_ids: list[int]) -> None:
        self._vocab, self._ids = vocab, token_ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]
        return self._vocab.many(self._ids[i]) if isinstance(i, slice) else self._vocab[self._ids[i]]

    def as_list(self) -> list[str]:
        return self._vocab.many(self._ids)


# ---------------------------------------------------------------------------------------------- contexts
class ContextStore:
    """Token ids of every stored context of a run, held in memory (4 bytes a token) once per file: a
    context lookup is then an array slice instead of a DuckDB scan of the contexts table."""

    def __init__(self, context_ids: np.ndarray, flat: np.ndarray, offsets: np.ndarray,
                 mid_document: np.ndarray | None = None, warmup_positions: int = 0) -> None:
        self.flat, self.offsets = flat, offsets
        self.row_of = {int(c): i for i, c in enumerate(context_ids)}
        self.mid_document = np.zeros(len(context_ids), dtype=bool) if mid_document is None else mid_document
        self.warmup_positions = warmup_positions

    def tokens(self, context_id: int) -> list[int]:
        row = self.row_of.get(context_id)
        if row is None:
            return []
        return self.flat[self.offsets[row]:self.offsets[row + 1]].tolist()

    def warmup(self, context_id: int) -> int:
        """How many positions after BOS did not count in this context: the run's warm-up when it starts
        mid-document (featurescope/positions.py), else 0."""
        row = self.row_of.get(context_id)
        return self.warmup_positions if row is not None and self.mid_document[row] else 0


def context_store(sae: SAEInfo) -> ContextStore:
    def build() -> ContextStore:
        with sae.file.connect() as conn:
            result = conn.execute(sa.select(Context.context_id, Context.token_ids, Context.starts_document)
                                  .where(Context.run_id == sae.run_id))
            with warnings.catch_warnings():  # "Arrow output on a DB-API result makes an extra copy": once per file
                warnings.simplefilter("ignore")
                table = result.cursor.to_arrow_table()
        lists = table.column(1).combine_chunks()
        mid_document = ~table.column(2).fill_null(True).to_numpy(zero_copy_only=False).astype(bool)  # NULL: before 0005
        return ContextStore(table.column(0).to_numpy(), lists.values.to_numpy(zero_copy_only=False).astype(np.int32),
                            lists.offsets.to_numpy(), mid_document, int(run_config(sae).get("warmup_positions", 0)))

    return sae.file.cached(("contexts", sae.run_id), build)


def feature_labels(sae: SAEInfo) -> dict[int, tuple[str | None, str | None, float]]:
    """(label, label_kind, density) of every feature of an SAE, loaded once per file; neighbour lists and
    links read it instead of querying."""
    def build() -> dict[int, tuple[str | None, str | None, float]]:
        with sae.file.connect() as conn:
            rows = conn.execute(sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density)
                                .where(Feature.model_id == sae.model_id, Feature.sae_id == sae.id)).all()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    return sae.file.cached(("labels", sae.model_id, sae.id), build)



@dataclass(frozen=True)
class FeatureBrief:
    """Label, density and maximum activation of every feature of an SAE, as arrays indexed by feature."""
    labels: list[str | None]
    label_kinds: list[str | None]
    density: np.ndarray
    max_act: np.ndarray


def feature_briefs(sae: SAEInfo) -> FeatureBrief:
    """What a live page shows beside each feature it lists, loaded once per file."""
    def build() -> FeatureBrief:
        with sae.file.connect() as conn:
            rows = conn.execute(sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density,
                                          Feature.max_act)
                                .where(Feature.model_id == sae.model_id, Feature.sae_id == sae.id)).all()
        labels: list[str | None] = [None] * sae.d_sae
        kinds: list[str | None] = [None] * sae.d_sae
        density, max_act = np.zeros(sae.d_sae), np.zeros(sae.d_sae)
        for f, label, kind, d, m in rows:
            if 0 <= f < sae.d_sae:
                labels[f], kinds[f], density[f], max_act[f] = label, kind, d or 0.0, m or 0.0
        return FeatureBrief(labels, kinds, density, max_act)

    return sae.file.cached(("briefs", sae.model_id, sae.id), build)




def run_config(sae: SAEInfo) -> dict[str, Any]:
    """The precompute config of the run that computed an SAE's features (the live encoder uses its dtype)."""
    def build() -> dict[str, Any]:
        with sae.file.connect() as conn:
            config = conn.execute(sa.select(Run.config).where(Run.id == sae.run_id)).scalar()
        return json.loads(config) if isinstance(config, str) else dict(config or {})

    return sae.file.cached(("run_config", sae.run_id), build)



def links_computed(sae: SAEInfo) -> bool:
    """Whether the run that published an SAE computed cross-layer links (`featurescope precompute --no-links`
    does not)."""
    return bool(run_config(sae).get("links", True))


# ------------------------------------------------------------------------------------------- shared rows
def peak_tokens(conn: sa.Connection, sae: SAEInfo, features: list[int]) -> dict[int, list[int]]:
    """Token id at the maximum of each top example, strongest example first, for each feature."""
    if not features:
        return {}
    rows = conn.execute(sa.select(Feature.feature, Feature.peak_token_ids).where(rows_of(sae, features))).all()
    return {feature: list(peaks) for feature, peaks in rows if peaks}


def rows_of(sae: SAEInfo, features: list[int]) -> sa.ColumnElement[bool]:
    """Some features' rows of an SAE, found through the feature_key index."""
    return Feature.feature_key.in_([feature_key(sae.number, f) for f in features])


def label_or_auto(stored: str | None, kind: str | None, peak_ids: list[int], promoted_ids: list[int] | None,
           vocab: TokenTexts) -> tuple[str, str]:
    """The stored label, or for rows written without one the automatic label the writer would have stored."""
    if stored is not None:
        return stored, kind or LABEL_KIND_AUTO
    return auto_label([vocab[t] for t in peak_ids], [vocab[t] for t in (promoted_ids or [])]), LABEL_KIND_AUTO



def top_tokens(peak_ids: list[int], vocab: TokenTexts) -> list[TokenCount]:
    """The tokens a feature's top examples peak on most often, with how many examples peak on each."""
    return [{"token_id": t, "text": vocab[t], "count": n} for t, n in Counter(peak_ids).most_common(PEAK_TOKENS_SHOWN)]
