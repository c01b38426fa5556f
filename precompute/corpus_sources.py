"""Where the precompute job's text comes from. One spec string names a corpus:

    python-docs                      the built-in offline corpus (Python docs + stdlib docstrings)
    path/to/file.txt | .jsonl | .parquet, or a folder of such files (sorted, recursively)
    hf:NAME                          a Hugging Face dataset, streamed (with dataset_config, split, data_files)

Every source yields plain strings in a deterministic order; packing them into BOS-first contexts is
featurescope.corpus.pack_contexts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from featurescope.cli_options import setting
from featurescope.errors import FeatureScopeError

BUILTIN = "python-docs"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(FeatureScopeError, ValueError):
    """A corpus that cannot be read; the message names the fix."""


@dataclass(frozen=True)
class CorpusSpec:
    source: str = setting(BUILTIN, f"'{BUILTIN}' (built in), a .txt/.jsonl/.parquet file or folder, or hf:DATASET.",
                          flags=("--corpus",))
    text_column: str = setting("text", "Text column of .jsonl/.parquet/hf: corpora.")
    dataset_config: str | None = setting(None, "hf: dataset config name.")
    split: str = setting("train", "hf: dataset split.")
    data_files: str | None = setting(None, "hf: data_files (for the json/parquet/text builders).")

    def describe(self) -> str:
        if self.source.startswith("hf:"):
            parts = [self.source, self.dataset_config or "", self.split, self.text_column]
            return ":".join(p for p in parts if p)
        return self.source


def iter_texts(spec: CorpusSpec) -> Iterator[str]:
    """The corpus's documents, in a fixed order. Raises CorpusError before yielding on a bad spec."""
    if spec.source == BUILTIN:
        from featurescope.corpus import python_docs_corpus  # imports torch; a spec is built without it

        return python_docs_corpus()
    if spec.source.startswith("hf:"):
        return _hf_texts(spec)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise CorpusError(
            f"Corpus {spec.source!r} is not '{BUILTIN}', not 'hf:<dataset>' and not an existing file or folder."
        )
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise CorpusError(f"Corpus file {spec.source!r} is not .txt, .jsonl or .parquet.")
    if not files:
        raise CorpusError(f"Corpus folder {spec.source!r} holds no .txt, .jsonl or .parquet files.")
    for f in files:  # check columns up front, so a typo fails before the model loads
        _check_column(f, spec.text_column)
    return (text for f in files for text in _file_texts(f, spec.text_column))


def _check_column(path: Path, column: str) -> None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    elif path.suffix == ".jsonl":
        with path.open() as fh:
            first = next((line for line in fh if line.strip()), None)
        names = list(json.loads(first)) if first else [column]
    else:
        return
    if column not in names:
        raise CorpusError(f"{path} has no column {column!r}; its columns are {', '.join(map(str, names))}. Pass --text-column.")


def _file_texts(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        # Blank-line-separated paragraphs are documents: one huge file still streams.
        paragraph: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).strip()
                    paragraph = []
        if paragraph:
            yield "".join(paragraph).strip()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    value = json.loads(line).get(column)
                    if isinstance(value, str) and value.strip():
                        yield value
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip():
                    yield value


def _hf_texts(spec: CorpusSpec) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise CorpusError("Hugging Face corpora need the `datasets` package: pip install datasets.") from exc
    name = spec.source.removeprefix("hf:")
    kwargs = {"data_files": spec.data_files} if spec.data_files else {}
    try:
        stream = datasets.load_dataset(name, spec.dataset_config, split=spec.split, streaming=True, **kwargs)
    except Exception as exc:
        raise CorpusError(f"Could not open dataset {name!r} (config {spec.dataset_config!r}, split {spec.split!r}): {exc}") from exc
    columns = stream.column_names or list(next(iter(stream)).keys())
    if spec.text_column not in columns:
        raise CorpusError(f"Dataset {name!r} has no column {spec.text_column!r}; its columns are {', '.join(columns)}. Pass --text-column.")
    return (row[spec.text_column] for row in stream if isinstance(row[spec.text_column], str) and row[spec.text_column].strip())
