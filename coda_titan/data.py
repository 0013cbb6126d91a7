"""Offline training data for TorchTitan: real text that ships with Python.

No files are stored in the repository and nothing is downloaded: the corpora are
built at run time from what the Python installation carries.  There are two.

The docstring corpus (``coda_offline``, English prose) has two sources that every
CPython installation carries.

1. ``pydoc_data.topics.topics`` -- the Python documentation topics that
   ``help()`` shows (the language reference: ``if``, ``try``, data model,
   sequence types, ...).  One document per topic, in sorted key order.
2. Docstrings of the standard library.  Every ``.py`` file below
   ``sysconfig.get_paths()["stdlib"]`` is parsed with :mod:`ast` (sorted by
   path relative to the stdlib root; directories named ``test``, ``tests``,
   ``idlelib``, ``site-packages`` and ``__pycache__`` are skipped), and every
   module, class and function docstring longer than 200 characters becomes one
   document (cleaned with ``inspect.cleandoc``; exact duplicates are dropped,
   keeping the first occurrence).

The result is deterministic for a given Python version.  About 5% of documents
are held out for validation, chosen by content hash (``crc32(doc) % 20 == 0``),
so the split does not depend on document order.

License: all of this text is part of CPython (its documentation and source
code) and is distributed under the PSF License Agreement (Python Software
Foundation License Version 2).  The corpus, and the tokenizer trained on it in
``coda_titan/assets/tokenizer/`` (see ``scripts/build_tokenizer.py``), are
derived from it under the same license.

Size on CPython 3.11.7 (Linux x86-64); tokens are counted with the bundled
2048-entry byte-level BPE tokenizer (``coda_titan/assets/tokenizer/``), without
BOS/EOS (add 2 per document when packed by TorchTitan):

    =========================  =====  =========  =======
    split                      docs   chars      tokens
    =========================  =====  =========  =======
    all                        2328   1,700,890  539,518
    coda_offline (train)       2212   1,636,011  518,656
    coda_offline_validation     116      64,879   20,862
    =========================  =====  =========  =======

(79 topic documents with 464,891 chars, and 2249 docstring documents with
1,235,999 chars; ~3.2 chars per token.  Other Python versions give somewhat
different numbers; building the corpus takes ~1-2 s and is cached per process.)

The source corpus (``coda_offline_source``) holds whole ``.py`` files: the
stdlib's (tests included) and those of every ``site-packages`` directory on
``sys.path``, one document per file of 200 characters to 256 KiB (larger files
are generated tables), exact duplicates dropped.  Files are ordered by the
crc32 of their path below their root, so that packages interleave.  It exists
because the docstring corpus is small: a 1000-step run at 16384 tokens a step
(the 1B configs) passes over it some thirty times and measures memorisation.
The stdlib alone holds ~11.6M tokens (CPython 3.11); with site-packages an
environment with torch holds tens of millions.  It depends on the installed
packages, so compare runs made in one environment.  The text is under its
packages' licenses; it is read, not redistributed.

Registered TorchTitan datasets (``register_offline_dataset()``), each corpus
split ~95/5 by content hash:

* ``"coda_offline"`` and ``"coda_offline_validation"``;
* ``"coda_offline_source"`` and ``"coda_offline_source_validation"``.

Both loaders return a map-style :class:`datasets.Dataset` with a single
``"text"`` column, so TorchTitan's ``HuggingFaceTextDataset`` can checkpoint and
resume them by sample index.  The dataset ``path`` is descriptive only
(``"python-stdlib"``); the loaders ignore it.  Use them with e.g.
``--training.dataset coda_offline --validation.dataset coda_offline_validation
--model.hf_assets_path <repo>/coda_titan/assets/tokenizer``.

Importing this module only imports the standard library; ``torchtitan`` and
``datasets`` are imported when the datasets are registered or loaded.
"""

from __future__ import annotations

import ast
import functools
import gc
import logging
import os
import sys
import sysconfig
import zlib
from typing import Any, Iterator

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "VOCAB_SIZE",
    "DATASET_NAME",
    "VALIDATION_DATASET_NAME",
    "SOURCE_DATASET_NAME",
    "SOURCE_VALIDATION_DATASET_NAME",
    "CORPORA",
    "DATASET_PATH",
    "TOKENIZER_DIR",
    "offline_documents",
    "train_documents",
    "validation_documents",
    "is_validation_document",
    "load_offline_dataset",
    "register_offline_dataset",
    "load_tokenizer",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# TorchTitan's llama3 "debugmodel" has vocab_size=2048.
VOCAB_SIZE = 2048

DATASET_NAME = "coda_offline"
VALIDATION_DATASET_NAME = "coda_offline_validation"
SOURCE_DATASET_NAME = "coda_offline_source"
SOURCE_VALIDATION_DATASET_NAME = "coda_offline_source_validation"
CORPORA = ("docstrings", "source")
# Descriptive only: the loaders ignore the path they are given.
DATASET_PATH = "python-stdlib"

# Directory holding tokenizer.json + tokenizer_config.json, loadable with
# torchtitan.components.tokenizer.HuggingFaceTokenizer(TOKENIZER_DIR).
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")

MIN_DOCSTRING_CHARS = 200
# A document goes to validation when crc32(text) % VALIDATION_MODULUS == 0 (~5%).
VALIDATION_MODULUS = 20

MIN_SOURCE_CHARS = 200
MAX_SOURCE_CHARS = 256 * 1024

_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
# site-packages directories are roots of their own (when on sys.path), so the
# stdlib walk leaves out the one inside it.
_SOURCE_SKIP_DIRS = frozenset({"site-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Nodes that can (transitively) contain class/function definitions.
_CONTAINER_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------


def _topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append(text)
    return docs


def _py_files(root: str, skip: frozenset[str]) -> list[tuple[str, str]]:
    """(POSIX path relative to ``root``, path) of every .py file below ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return found


def _stdlib_source_files() -> list[str]:
    """Paths of the stdlib's .py files, sorted by POSIX path relative to the root."""
    return [path for _, path in sorted(_py_files(sysconfig.get_paths()["stdlib"], _SKIP_DIRS))]


def _source_roots() -> list[str]:
    """The stdlib, then every site-packages directory on ``sys.path``, once each."""
    candidates = [sysconfig.get_paths()["stdlib"]] + [
        p for p in sys.path if os.path.basename(os.path.normpath(p)) in ("site-packages", "dist-packages")
    ]
    roots = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in roots:
            roots.append(real)
    return roots


def _source_documents(roots: list[str]) -> list[str]:
    """Whole .py files below ``roots`` of MIN_SOURCE_CHARS to MAX_SOURCE_CHARS,
    ordered by (crc32 of the relative path, relative path)."""
    found = [f for root in roots for f in _py_files(root, _SOURCE_SKIP_DIRS)]
    found.sort(key=lambda f: (zlib.crc32(f[0].encode("utf-8")), f[0]))
    docs = []
    for _, path in found:
        try:
            # A UTF-8 file has at most as many chars as bytes and at least a
            # quarter as many: a file under MIN bytes is skipped unread, and
            # 4 * MAX + 1 bytes decide the upper bound without reading a huge one whole.
            if os.path.getsize(path) < MIN_SOURCE_CHARS:
                continue
            with open(path, "rb") as f:
                raw = f.read(4 * MAX_SOURCE_CHARS + 1)
        except OSError:
            continue
        text = raw.decode("utf-8", errors="replace").strip()
        if MIN_SOURCE_CHARS <= len(text) <= MAX_SOURCE_CHARS:
            docs.append(text)
    return docs


def _iter_doc_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Module/class/function nodes in source order (depth-first, statements only)."""
    if isinstance(node, _DOC_NODES):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _CONTAINER_NODES):
            yield from _iter_doc_nodes(child)


def _docstring_documents() -> list[str]:
    docs = []
    # Parsing ~11 MB of source allocates millions of short-lived AST nodes; with
    # a large heap already alive (torch), cyclic GC passes would dominate the
    # run time.  The trees are freed by reference counting, so pause the GC.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in _stdlib_source_files():
            docs.extend(_file_docstrings(path))
    finally:
        if gc_was_enabled:
            gc.enable()
    return docs


def _file_docstrings(path: str) -> list[str]:
    """Module/class/function docstrings longer than MIN_DOCSTRING_CHARS."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    docs = []
    for node in _iter_doc_nodes(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) > MIN_DOCSTRING_CHARS:
            docs.append(doc.strip())
    return docs


def offline_documents(corpus: str = "docstrings") -> list[str]:
    """All documents of a corpus, deduplicated: ``"docstrings"`` (topics, then
    stdlib docstrings) or ``"source"`` (whole .py files of the installation).

    Deterministic for a given Python installation.  Cached: the same list
    object is returned on every call, so do not mutate it.
    """
    return _documents(corpus)


# Cached apart from offline_documents, whose default argument would otherwise
# key a second copy of the corpus beside the one the datasets name explicitly.
@functools.lru_cache(maxsize=None)
def _documents(corpus: str) -> list[str]:
    if corpus == "docstrings":
        candidates = _topic_documents() + _docstring_documents()
    elif corpus == "source":
        candidates = _source_documents(_source_roots())
    else:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")
    seen: set[str] = set()
    docs = []
    for doc in candidates:
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    logging.getLogger(__name__).info(
        "coda_offline %s corpus: %d documents, %d chars", corpus, len(docs), sum(map(len, docs))
    )
    return docs


def is_validation_document(doc: str) -> bool:
    """Deterministic ~5% hold-out, by content hash (independent of order)."""
    return zlib.crc32(doc.encode("utf-8")) % VALIDATION_MODULUS == 0


@functools.lru_cache(maxsize=None)
def _split(corpus: str, validation: bool) -> tuple[str, ...]:
    return tuple(d for d in offline_documents(corpus) if is_validation_document(d) == validation)


def train_documents(corpus: str = "docstrings") -> list[str]:
    """The ~95% of a corpus's documents that its training dataset holds."""
    return list(_split(corpus, False))


def validation_documents(corpus: str = "docstrings") -> list[str]:
    """The ~5% of a corpus's documents that its validation dataset holds."""
    return list(_split(corpus, True))


# --------------------------------------------------------------------------
# TorchTitan / HF datasets integration
# --------------------------------------------------------------------------


def load_offline_dataset(path: str | None = None, split: str = "train", corpus: str = "docstrings"):
    """Map-style ``datasets.Dataset`` with a ``"text"`` column.

    ``path`` is ignored (TorchTitan passes ``DatasetConfig.path`` or
    ``--training.dataset_path``); ``split`` is ``"train"``, ``"validation"``
    or ``"all"``; ``corpus`` is one of CORPORA.
    """
    from datasets import Dataset

    if split == "train":
        docs = train_documents(corpus)
    elif split == "validation":
        docs = validation_documents(corpus)
    elif split == "all":
        docs = list(offline_documents(corpus))
    else:
        raise ValueError(f"unknown split {split!r}; expected train, validation or all")
    return Dataset.from_dict({"text": docs})


def _process_text(sample: dict[str, Any]) -> str:
    return sample["text"]


@functools.lru_cache(maxsize=None)
def _dataset_configs() -> dict[str, Any]:
    from torchtitan.hf_datasets import DatasetConfig

    splits = {
        DATASET_NAME: ("docstrings", "train"),
        VALIDATION_DATASET_NAME: ("docstrings", "validation"),
        SOURCE_DATASET_NAME: ("source", "train"),
        SOURCE_VALIDATION_DATASET_NAME: ("source", "validation"),
    }
    return {
        name: DatasetConfig(
            path=DATASET_PATH,
            loader=functools.partial(load_offline_dataset, split=split, corpus=corpus),
            sample_processor=_process_text,
        )
        for name, (corpus, split) in splits.items()
    }


def register_offline_dataset() -> tuple[str, ...]:
    """Add the ``coda_offline`` datasets (both corpora, training and validation)
    to TorchTitan's ``torchtitan.hf_datasets.text_datasets.DATASETS``.  Idempotent.

    Building a corpus is deferred until its dataset is actually loaded.
    Returns the registered names.
    """
    from torchtitan.hf_datasets.text_datasets import DATASETS

    for name, config in _dataset_configs().items():
        DATASETS[name] = config
    return tuple(_dataset_configs())


def load_tokenizer(path: str | None = None):
    """``torchtitan.components.tokenizer.HuggingFaceTokenizer`` for the bundled
    2048-entry byte-level BPE tokenizer (or the one in ``path``)."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(path or TOKENIZER_DIR)
