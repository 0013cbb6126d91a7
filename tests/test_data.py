"""Tests for the offline corpus, the ``coda_offline`` datasets and the tokenizer."""

import os
import sys

import pytest

import coda_titan.data as data

SEQ_LEN = 64


@pytest.fixture(scope="module")
def docs():
    return data.offline_documents()


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def registered():
    data.register_offline_dataset()
    from torchtitan.hf_datasets.text_datasets import DATASETS

    return DATASETS


# ----------------------------------------------------------------- corpus


def test_import_is_light():
    """data.py itself imports only the standard library (torchtitan, datasets
    and tokenizers are imported lazily).  Loaded standalone, so that whatever
    coda_titan/__init__.py imports does not count."""
    import subprocess

    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('_coda_data', %r)\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "heavy = ('torch', 'torchtitan', 'datasets', 'tokenizers', 'numpy', 'transformers')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    ) % data.__file__
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_corpus_nonempty(docs):
    assert len(docs) > 1000
    assert sum(map(len, docs)) > 500_000
    assert all(isinstance(d, str) and d and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)
    # Real English prose from the documentation topics and docstrings.
    joined = "\n".join(docs[:200])
    for word in (" the ", " of ", " is ", " and "):
        assert word in joined


def test_corpus_cached_and_deterministic(docs):
    assert data.offline_documents() is docs
    rebuilt = data._documents.__wrapped__("docstrings")
    assert rebuilt is not docs
    assert rebuilt == docs


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_source_documents(tmp_path):
    """Whole files within the size bounds, ordered by the crc32 of the path
    below each root; caches, nested site-packages and non-.py files left out."""
    import zlib

    stdlib, site = tmp_path / "lib", tmp_path / "site-packages"
    body = "def f():\n    return 1\n" * 20
    kept = {
        ("lib", "os.py"): body + "# os\n",
        ("lib", "email/parser.py"): body + "# parser\n",
        ("site", "pkg/__init__.py"): body + "# pkg\n",
        ("site", "pkg/sub/mod.py"): "x = 1\n" * (data.MAX_SOURCE_CHARS // 6),
    }
    for (root, rel), text in kept.items():
        _write(stdlib if root == "lib" else site, rel, text)
    _write(stdlib, "tiny.py", "x = 1\n")
    _write(stdlib, "table.py", "x" * (data.MAX_SOURCE_CHARS + 1))
    _write(stdlib, "__pycache__/os.py", body)
    _write(stdlib, "site-packages/other.py", body)
    _write(stdlib, "notes.txt", body)

    docs = data._source_documents([str(stdlib), str(site)])
    order = sorted(kept, key=lambda k: (zlib.crc32(k[1].encode()), k[1]))
    assert docs == [kept[k].strip() for k in order]


def test_source_roots(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    (tmp_path / "repo").mkdir()
    link = tmp_path / "link" / "site-packages"
    link.parent.mkdir()
    link.symlink_to(site)
    monkeypatch.setattr(
        sys, "path", [str(tmp_path / "repo"), str(site), str(link) + "/", str(tmp_path / "dist-packages")]
    )
    import sysconfig

    assert data._source_roots() == [os.path.realpath(sysconfig.get_paths()["stdlib"]), str(site)]


def test_source_corpus():
    docs = data.offline_documents("source")
    assert data.offline_documents("source") is docs
    assert len(set(docs)) == len(docs)
    assert all(data.MIN_SOURCE_CHARS <= len(d) <= data.MAX_SOURCE_CHARS for d in docs)
    # The stdlib alone is ~30 MB of source: far more than the docstring corpus.
    assert sum(map(len, docs)) > 20 * sum(map(len, data.offline_documents()))
    assert any(d.startswith('"""Common operations on Posix pathnames.') for d in docs)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        data.offline_documents("wiki")


def test_train_validation_split(docs):
    train = data.train_documents()
    val = data.validation_documents()
    assert len(train) + len(val) == len(docs)
    assert not set(train) & set(val)
    assert 0.02 < len(val) / len(docs) < 0.10
    assert all(data.is_validation_document(d) for d in val)
    assert data.train_documents() == train and data.validation_documents() == val


# ---------------------------------------------------------------- datasets


def test_registration_idempotent(registered):
    from datasets import Dataset
    from torchtitan.hf_datasets import DatasetConfig

    before = dict(registered)
    assert data.register_offline_dataset() == (
        "coda_offline", "coda_offline_validation", "coda_offline_source", "coda_offline_source_validation"
    )
    assert dict(registered) == before
    for name, n in (
        ("coda_offline", len(data.train_documents())),
        ("coda_offline_validation", len(data.validation_documents())),
        ("coda_offline_source", len(data.train_documents("source"))),
        ("coda_offline_source_validation", len(data.validation_documents("source"))),
    ):
        config = registered[name]
        assert isinstance(config, DatasetConfig)
        ds = config.loader(config.path)
        assert isinstance(ds, Dataset)  # map-style: checkpoint/resume by index
        assert len(ds) == n
        assert config.sample_processor(ds[0]) == ds[0]["text"]


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("name", ["coda_offline", "coda_offline_validation", "coda_offline_source"])
def test_text_dataset_yields_samples(registered, tokenizer, name):
    import torch
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    ds = HuggingFaceTextDataset(
        dataset_name=name, dataset_path=None, tokenizer=tokenizer, seq_len=SEQ_LEN
    )
    samples = _take(ds, 8)
    for inputs, labels in samples:
        assert set(inputs) == {"input"}
        x = inputs["input"]
        assert x.dtype == torch.long and labels.dtype == torch.long
        assert x.shape == (SEQ_LEN,) and labels.shape == (SEQ_LEN,)
        assert torch.equal(x[1:], labels[:-1])
        assert int(x.max()) < data.VOCAB_SIZE and int(x.min()) >= 0
    assert samples[0][0]["input"][0].item() == tokenizer.bos_id


def test_text_dataset_resume(registered, tokenizer):
    import torch
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    def make():
        return HuggingFaceTextDataset(
            dataset_name="coda_offline", dataset_path=None, tokenizer=tokenizer, seq_len=SEQ_LEN
        )

    ds = make()
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    assert "sample_idx" in state  # map-style dataset
    expected = [next(it) for _ in range(3)]

    resumed = make()
    resumed.load_state_dict(state)
    got = _take(resumed, 3)
    for (ei, el), (gi, gl) in zip(expected, got):
        assert torch.equal(ei["input"], gi["input"]) and torch.equal(el, gl)


# --------------------------------------------------------------- tokenizer


def test_tokenizer_files_small():
    files = ["tokenizer.json", "tokenizer_config.json"]
    sizes = [os.path.getsize(os.path.join(data.TOKENIZER_DIR, f)) for f in files]
    assert sum(sizes) < 300 * 1024


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.vocab_size == data.VOCAB_SIZE == 2048
    assert tokenizer.bos_token == data.BOS_TOKEN and tokenizer.eos_token == data.EOS_TOKEN
    assert tokenizer.bos_id is not None and tokenizer.eos_id is not None
    assert tokenizer.bos_id != tokenizer.eos_id
    assert max(tokenizer.bos_id, tokenizer.eos_id) < data.VOCAB_SIZE

    text = "The quick brown fox jumps over the lazy dog."
    plain = tokenizer.encode(text)
    assert tokenizer.bos_id not in plain and tokenizer.eos_id not in plain
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids == [tokenizer.bos_id] + plain + [tokenizer.eos_id]
    assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eos_id) == 1


def test_tokenizer_round_trip(tokenizer, docs):
    samples = list(docs[::50]) + [
        "Hello, world!  Two  spaces,\ttabs\nand newlines.\n",
        "Unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f40d, \u2200x \u2208 \u211d",
        "def f(x):\n    return x ** 2  # squares\n",
        "",
    ]
    for text in samples:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert all(0 <= i < data.VOCAB_SIZE for i in ids)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=False) == (
            data.BOS_TOKEN + text + data.EOS_TOKEN
        )


def test_tokenizer_compresses_corpus(tokenizer):
    val = data.validation_documents()
    chars = sum(map(len, val))
    tokens = sum(len(tokenizer.encode(d)) for d in val)
    # A BPE trained on this text should do much better than bytes.
    assert chars / tokens > 2.5
