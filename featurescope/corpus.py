"""The built-in offline corpus (Python's own documentation) and packing text into fixed-length contexts.

Works with no network: the text comes from `pydoc_data.topics` (the language reference topics that
`help()` shows) plus the docstrings of a fixed list of standard-library modules.

    texts = list(python_docs_corpus())                     # deterministic order
    ids = pack_contexts(lm, texts, context_len=128)        # [n_contexts, 128], each row starts with BOS
    ids, starts = pack_documents(lm, texts, 128)           # and bool [n_contexts]: the row starts a document
    mask = content_mask(lm, ids)                           # True where a position counts in statistics
    sample, rest = pick_spread(ids, 100)                   # 100 contexts spread over the corpus, and the others
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from featurescope.models import LoadedModel

# A fixed list, so the corpus is the same on every machine with the same Python. Modules that would
# open windows, play sounds or print on import (antigravity, this, turtle, tkinter, ...) are left out;
# modules missing from a given Python build are skipped.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "builtins", "bz2",
    "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes",
    "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis", "doctest", "email", "email.message",
    "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.resources", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap", "modulefinder",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "wsgiref", "xml.dom.minidom", "xml.etree.ElementTree",
    "xmlrpc.client", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)
MIN_DOC_CHARS = 80  # one-line docstrings ("Return self+value.") add tokens but no content


def python_docs_corpus(modules: Iterable[str] = STDLIB_MODULES) -> Iterator[str]:
    """Documents of the built-in corpus: pydoc topics (sorted by name), then module docstrings."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    for module_name in modules:
        yield from module_docstrings(module_name)


def module_docstrings(module_name: str) -> Iterator[str]:
    """The module's docstring, then those of its public functions, classes and their methods, in name order."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # absent from this Python build, or needs a system library: skip it
        return
    seen: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # typing.re & co. warn when their docstrings are read
        docs = [inspect.getdoc(obj) for obj in [module, *_public_members(module, module_name)]]
    for doc in docs:
        if doc and len(doc) >= MIN_DOC_CHARS and id(doc) not in seen:
            seen.add(id(doc))
            yield doc


def _public_members(module, module_name: str) -> list:
    members = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__ and getattr(obj, "__module__", None) != module_name:
            continue  # re-exported from elsewhere: documented once, where it is defined
        members.append(obj)
        if inspect.isclass(obj):
            members.extend(m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and inspect.isroutine(m))
    return members


class PackedContexts(NamedTuple):
    ids: torch.Tensor  # [n_contexts, context_len] long, BOS first
    starts_document: torch.Tensor  # [n_contexts] bool: the row's first corpus token begins a document


def pack_contexts(lm: LoadedModel, texts: Iterable[str], context_len: int = 128,
                  max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise, join documents with EOS, cut into rows of BOS + (context_len - 1) corpus tokens.

    Returns a LongTensor [n_contexts, context_len]; the incomplete last row is dropped. `max_tokens`
    caps the corpus tokens used (BOS not counted), so a budget stops tokenising early.
    """
    return pack_documents(lm, texts, context_len, max_tokens).ids


def pack_documents(lm: LoadedModel, texts: Iterable[str], context_len: int = 128,
                   max_tokens: int | None = None) -> PackedContexts:
    """pack_contexts' rows, and for each whether it starts a document: its first corpus token is a document's
    first, or the EOS that ends the previous one. The other rows start mid-document, which decides their
    warm-up (featurescope/positions.py)."""
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2 (BOS + one token), got {context_len}.")
    eos = lm.tokenizer.eos_token_id
    body = context_len - 1
    stream: list[int] = []
    doc_starts: list[int] = []  # offsets in stream of each document's first token
    for text in texts:
        doc_starts.append(len(stream))
        stream.extend(lm.tokenize(text, prepend_bos=False))
        if eos is not None:
            stream.append(int(eos))
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // body
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)  # (n, context_len - 1)
    bos = torch.full((n, 1), lm.bos_token_id, dtype=torch.long)
    starts = torch.isin(torch.arange(n) * body, torch.tensor(doc_starts, dtype=torch.long))
    if eos is not None:
        starts |= rows[:, 0] == eos
    return PackedContexts(torch.cat([bos, rows], dim=1), starts)  # (n, context_len), (n,)


def content_mask(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like `ids`: True at positions that are not special tokens (BOS, EOS, pad, ...)."""
    special = torch.tensor(sorted(lm.special_token_ids), dtype=ids.dtype, device=ids.device)
    return ~torch.isin(ids, special)


def spread_rows(n_rows: int, n: int) -> torch.Tensor:
    """Indices of n of n_rows rows spread evenly, first and last included, so a sample covers the whole corpus."""
    if not 0 < n <= n_rows:
        raise ValueError(f"Cannot pick {n} of {n_rows} contexts.")
    return torch.linspace(0, n_rows - 1, n).round().long()


def pick_spread(contexts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(picked, rest): n contexts spread evenly over `contexts` (spread_rows), and the others, both in corpus order."""
    picked = torch.zeros(contexts.shape[0], dtype=torch.bool)
    picked[spread_rows(contexts.shape[0], n)] = True
    return contexts[picked], contexts[~picked]


def split_contexts(contexts: torch.Tensor, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): every k-th context is held out, so both halves cover the whole corpus."""
    n = contexts.shape[0]
    if not 0 < held_out < n:
        raise ValueError(f"held_out must be between 1 and {n - 1} contexts, got {held_out}.")
    held, train = pick_spread(contexts, held_out)
    return train, held
