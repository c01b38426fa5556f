"""Every corpus source the precompute job reads yields the same documents in a fixed order, and a bad
spec fails before any model work with a message naming the fix."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurescope.precompute.corpus_sources import CorpusError, CorpusSpec, iter_texts

DOCS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "<script>alert(1)</script> &amp;"]


@pytest.fixture
def corpus_files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS) + "\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    pq.write_table(pa.table({"text": DOCS, "id": list(range(3))}), tmp_path / "docs.parquet")
    return tmp_path


@pytest.mark.parametrize("name", ["docs.txt", "docs.jsonl", "docs.parquet"])
def test_local_files_yield_their_documents_in_order(corpus_files, name):
    assert list(iter_texts(CorpusSpec(str(corpus_files / name)))) == DOCS


def test_a_folder_reads_its_files_sorted_by_path(corpus_files):
    assert list(iter_texts(CorpusSpec(str(corpus_files)))) == DOCS * 3  # docs.jsonl, docs.parquet, docs.txt


def test_a_hugging_face_dataset_streams_through_the_datasets_library(corpus_files):
    spec = CorpusSpec("hf:json", data_files=str(corpus_files / "docs.jsonl"))
    assert list(iter_texts(spec)) == DOCS


def test_the_builtin_corpus_is_deterministic():
    first = [t for _, t in zip(range(50), iter_texts(CorpusSpec()))]
    again = [t for _, t in zip(range(50), iter_texts(CorpusSpec()))]
    assert first == again and all(isinstance(t, str) and t for t in first)


@pytest.mark.parametrize("spec,message", [
    (CorpusSpec("NOPE"), "not an existing file or folder"),
    (CorpusSpec("docs.jsonl", text_column="body"), "has no column 'body'; its columns are text, id"),
    (CorpusSpec("docs.parquet", text_column="body"), "has no column 'body'"),
    (CorpusSpec("hf:json", data_files="docs.jsonl", text_column="body"), "has no column 'body'"),
    (CorpusSpec("notes.md"), "is not .txt, .jsonl or .parquet"),
])
def test_bad_corpus_specs_name_the_fix(corpus_files, spec, message):
    (corpus_files / "notes.md").write_text("hi")
    fix = lambda p: str(corpus_files / p) if p and not p.startswith("hf:") and p != "NOPE" else p  # noqa: E731
    spec = CorpusSpec(fix(spec.source), spec.text_column, data_files=fix(spec.data_files) if spec.data_files else None)
    with pytest.raises(CorpusError, match=message):
        list(iter_texts(spec))
