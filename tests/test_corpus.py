"""The built-in corpus and context packing. Run: .venv/bin/pytest tests/test_corpus.py"""

from __future__ import annotations

import pytest
import torch

from featurescope.corpus import (content_mask, module_docstrings, pack_contexts, pack_documents, python_docs_corpus,
                                 split_contexts)


def test_builtin_corpus_is_deterministic_and_holds_topics_and_docstrings():
    from pydoc_data.topics import topics

    first, second = list(python_docs_corpus()), list(python_docs_corpus())
    assert first == second
    assert first[0] == topics[sorted(topics)[0]].strip()
    assert len(first) > len(topics) + 500  # stdlib docstrings follow the topics
    assert any("Return a new list containing all items from the iterable" in d for d in first)  # builtins.sorted


def test_unimportable_module_is_skipped():
    assert list(module_docstrings("no_such_module_featurescope")) == []


def test_pack_contexts_starts_every_row_with_bos_and_joins_documents_with_eos(tiny_llama):
    lm = tiny_llama
    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n"] * 6
    ids = pack_contexts(lm, texts, context_len=16)
    assert ids.dtype == torch.long and ids.shape[1] == 16
    assert (ids[:, 0] == lm.bos_token_id).all()
    stream = []
    for t in texts:
        stream += lm.tokenize(t, prepend_bos=False) + [lm.tokenizer.eos_token_id]
    assert ids[:, 1:].reshape(-1).tolist() == stream[: ids.shape[0] * 15]
    assert len(stream) - ids.shape[0] * 15 < 15  # only the incomplete last row is dropped
    assert torch.equal(ids, pack_contexts(lm, texts, context_len=16))


def test_pack_documents_marks_the_rows_whose_first_token_begins_a_document(tiny_llama):
    lm = tiny_llama
    texts = ["The capital of France is Paris, a city on the Seine.", "def add(a, b):\n    return a + b\n"] * 6
    ids, starts = pack_documents(lm, texts, context_len=8)
    assert torch.equal(ids, pack_contexts(lm, texts, context_len=8))
    stream, begins = [], set()
    for t in texts:
        begins.add(len(stream))
        stream += lm.tokenize(t, prepend_bos=False) + [lm.tokenizer.eos_token_id]
    expected = [r * 7 in begins or stream[r * 7] == lm.tokenizer.eos_token_id for r in range(len(ids))]
    assert starts.tolist() == expected
    assert starts[0] and not starts.all()  # the corpus's first row starts a document; most rows do not


def test_pack_contexts_max_tokens_caps_corpus_tokens(tiny_llama):
    ids = pack_contexts(tiny_llama, ["Sparse autoencoders find features."] * 50, context_len=9, max_tokens=40)
    assert ids.shape == (5, 9)


def test_content_mask_excludes_bos_eos_and_pad(tiny_gemma2):
    lm = tiny_gemma2
    ids = torch.tensor([[lm.bos_token_id, 50, 60, lm.tokenizer.eos_token_id, 70, lm.tokenizer.pad_token_id]])
    assert content_mask(lm, ids).tolist() == [[False, True, True, False, True, False]]


def test_split_contexts_holds_out_spread_rows():
    contexts = torch.arange(100).view(50, 2)
    train, held = split_contexts(contexts, 5)
    assert held.shape[0] == 5 and train.shape[0] == 45
    assert held[0, 0] == 0 and held[-1, 0] == 98  # spread from the first to the last context
    assert not set(train[:, 0].tolist()) & set(held[:, 0].tolist())
    with pytest.raises(ValueError, match="held_out"):
        split_contexts(contexts, 50)
