#!/usr/bin/env python
"""Train the project's offline byte-level BPE tokenizer (vocab size 2048).

    python scripts/build_tokenizer.py [--out DIR]

Trains with the ``tokenizers`` library on the *training* split of the offline
corpus (``coda_titan.data.train_documents()``: CPython documentation topics and
stdlib docstrings, PSF License) and writes ``tokenizer.json`` and
``tokenizer_config.json`` into ``coda_titan/assets/tokenizer/`` (or ``--out``).
The directory loads with
``torchtitan.components.tokenizer.HuggingFaceTokenizer(path)``.

Layout: ids 0 and 1 are ``<|begin_of_text|>`` (BOS) and ``<|end_of_text|>``
(EOS), then the 256 byte symbols, then the learned merges; exactly 2048 ids in
all, so every id fits TorchTitan's llama3 ``debugmodel`` (vocab_size=2048).
The tokenizer itself adds no special tokens; TorchTitan's
``encode(text, add_bos=True, add_eos=True)`` adds exactly one of each.

Training is single-threaded and the corpus order is fixed, so the output is
byte-for-byte reproducible for a given Python version (the committed files were
built on CPython 3.11.7 with tokenizers 0.23.3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Deterministic, single-threaded training; must be set before importing tokenizers.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from coda_titan.data import (  # noqa: E402
    BOS_TOKEN,
    EOS_TOKEN,
    TOKENIZER_DIR,
    VOCAB_SIZE,
    train_documents,
    validation_documents,
)


def build_tokenizer(docs: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    def added(token: str) -> dict:
        return {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): added(t) for t in (BOS_TOKEN, EOS_TOKEN)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=TOKENIZER_DIR, help="output directory")
    args = parser.parse_args()

    docs = train_documents()
    tokenizer = build_tokenizer(docs)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise SystemExit(f"expected vocab size {VOCAB_SIZE}, got {size}")
    assert tokenizer.token_to_id(BOS_TOKEN) == 0 and tokenizer.token_to_id(EOS_TOKEN) == 1

    os.makedirs(args.out, exist_ok=True)
    tokenizer.save(os.path.join(args.out, "tokenizer.json"), pretty=True)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tokenizer), f, indent=2)
        f.write("\n")

    # The splits partition the corpus, so "all" is their sum (no third tokenization).
    splits = {"train": docs, "validation": validation_documents()}
    stats = {name: (len(ds), sum(map(len, ds)), sum(
        len(e.ids) for e in tokenizer.encode_batch(ds, add_special_tokens=False)))
        for name, ds in splits.items()}
    stats["all"] = tuple(map(sum, zip(*stats.values())))
    for name in ("all", "train", "validation"):
        n_docs, n_chars, n_tokens = stats[name]
        print(f"{name:>10}: {n_docs:6d} docs {n_chars:9d} chars {n_tokens:8d} tokens")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(args.out, name)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
