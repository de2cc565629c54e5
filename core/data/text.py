"""Tokenisation, vocabulary (the original's order) and word vectors from a chosen source.

The original turns a corpus text into words by one of two rules, named here:
``"text"`` (VQA questions, Flickr30K captions): lower-case, delete . , ' ! ? " ( ) * # : ;,
turn - and / into spaces, split on white space; ``"tokens"`` (RefCOCO, RefCOCO+, RefCOCOg):
the refer toolkit's ``tokens`` list exactly as given (punctuation such as ``.``, ``,``,
``-`` and ``/`` are words of their own there).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from utils.io import atomic_write, atomic_write_json

PAD, UNK, CLS = 0, 1, 2
_STRIP = re.compile(r"([.,'!?\"()*#:;])")


def tokenize(text: str) -> list[str]:
    """Lower-case, strip . , ' ! ? " ( ) * # : ;, turn - and / into spaces, split."""
    return _STRIP.sub("", text.lower()).replace("-", " ").replace("/", " ").split()


RULES = {"text": tokenize, "tokens": list}


def _words(item, rule: str) -> list[str]:
    if rule not in RULES:
        raise ValueError(f"unknown tokenisation rule {rule!r}; expected one of {list(RULES)}")
    return RULES[rule](item)


def build_vocab(texts: Iterable, rule: str = "text") -> dict[str, int]:
    """PAD = 0, UNK = 1, CLS = 2, then words in first-seen order (released weights rely on it).
    ``texts`` are strings (rule "text") or token lists (rule "tokens")."""
    vocab = {"PAD": PAD, "UNK": UNK, "CLS": CLS}
    for text in texts:
        for word in _words(text, rule):
            if word not in vocab:
                vocab[word] = len(vocab)
    return vocab


def encode(text, vocab: dict[str, int], max_len: int, rule: str = "text") -> np.ndarray:
    """Token ids padded with PAD to ``max_len``; unknown words -> UNK; longer texts cut."""
    ids = np.zeros(max_len, np.int64)
    words = _words(text, rule)[:max_len]
    ids[:len(words)] = [vocab.get(w, UNK) for w in words]
    return ids


def vocab_words(vocab: dict[str, int]) -> list[str]:
    """The words in index order (what a checkpoint records)."""
    return sorted(vocab, key=vocab.__getitem__)


# ---- word vectors -----------------------------------------------------------------------

def hash_vector(word: str, dim: int = 300) -> np.ndarray:
    """A deterministic pseudo-random vector per word, for offline runs and the demo."""
    seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:8], "little")
    return (np.random.default_rng(seed).standard_normal(dim) * 0.3).astype(np.float32)


class WordVectorError(ValueError):
    """The word-vector source cannot be read: not there, not installed, not word vectors."""


# Where the default GloVe file comes from (core/config.py: WORD_VECTORS).
GLOVE_HELP = ("download glove.840B.300d.zip (Common Crawl, 840B tokens, 300-d; 2.0 GB, "
              "5.6 GB unzipped) from https://nlp.stanford.edu/projects/glove/ and unzip it "
              "into datasets/glove/, or set WORD_VECTORS=glove:<its path>, "
              "WORD_VECTORS=spacy:en_core_web_lg (spaCy 3) or WORD_VECTORS=hash (offline tries)")


def _spacy_vectors(model: str, words: list[str], dim: int) -> np.ndarray:
    try:
        import spacy
    except Exception as e:      # not installed, or spaCy 2 under numpy 2 (binary mismatch)
        raise WordVectorError(f"WORD_VECTORS=spacy:{model}: spaCy cannot be imported "
                              f"({type(e).__name__}: {e}); pip install spacy (spaCy 3) and use "
                              f"spacy:en_core_web_lg, or use a GloVe file: {GLOVE_HELP}") from None
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise WordVectorError(f"WORD_VECTORS=spacy:{model}: spaCy model {model!r} is not "
                              f"installed ({str(e).splitlines()[0]}); spaCy 3: python -m spacy "
                              f"download en_core_web_lg and set WORD_VECTORS=spacy:en_core_web_lg "
                              f"(en_vectors_web_lg is spaCy 2 only); or {GLOVE_HELP}") from None
    width = nlp.vocab.vectors.shape[1] if len(nlp.vocab.vectors.shape) == 2 else 0
    if width != dim:
        raise WordVectorError(f"WORD_VECTORS=spacy:{model}: the model has "
                              f"{'no word vectors' if not width else f'{width}-d vectors'}, "
                              f"expected {dim}-d (WORD_EMBED_SIZE); use en_core_web_lg")
    # The original takes nlp(word).vector; the same call works for spaCy 2 and 3 models.
    return np.stack([nlp(w).vector for w in words]).astype(np.float32)


def _glove_vectors(path: str, words: list[str], dim: int) -> np.ndarray:
    """Vectors of ``words`` from a GloVe text file (one word and ``dim`` floats per line)."""
    file = Path(path)
    if not file.is_file():
        raise WordVectorError(f"WORD_VECTORS=glove:{path}: no such file; {GLOVE_HELP}")
    index = {w: i for i, w in enumerate(words)}
    out = np.zeros((len(words), dim), np.float32)   # words GloVe lacks stay zero, like spaCy
    with file.open("rb") as f:        # bytes, so that a bad byte is named with its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}, line {n}: not UTF-8 text ({e.reason} at column "
                                 f"{e.start + 1}); expected a GloVe text file") from None
            word, _, rest = line.rstrip("\n").partition(" ")
            if word in index:
                out[index[word]] = _glove_row(rest, dim, f"{file}, line {n} ({word!r})")
    return out


def _glove_row(text: str, dim: int, where: str) -> np.ndarray:
    values = text.split(" ")
    if len(values) != dim:
        raise ValueError(f"{where}: {len(values)} numbers, expected {dim}")
    try:
        return np.asarray(values, np.float32)
    except ValueError:
        raise ValueError(f"{where}: expected {dim} numbers, got {text[:60]!r}") from None


def word_vectors(source: str, words: list[str], dim: int = 300) -> np.ndarray:
    kind, _, arg = source.partition(":")
    if kind == "hash":
        return np.stack([hash_vector(w, dim) for w in words])
    if kind == "spacy":
        return _spacy_vectors(arg, words, dim)
    if kind == "glove":
        return _glove_vectors(arg, words, dim)
    raise ValueError(f"WORD_VECTORS={source!r}: expected 'spacy:<model>', 'glove:<path>' or "
                     f"'hash'")


def files_stamp(files: list[Path]) -> str:
    """Short hash of paths, sizes and modification times: a cache key that goes stale."""
    facts = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha1(json.dumps(facts).encode()).hexdigest()[:10]


def cached_vocab_and_vectors(cache_dir: Path, corpus_files: list[Path], texts,
                             source: str | None, dim: int, log, rule: str = "text"
                             ) -> tuple[dict[str, int], np.ndarray | None]:
    """Vocabulary and embedding matrix, computed once per corpus, rule and source, then cached.
    The rule is part of the cache name: a cache written under another rule is never read.

    ``source`` None: the vocabulary only (the embedding comes from a checkpoint), so that
    evaluating a checkpoint needs no word vectors."""
    stamp = files_stamp(corpus_files)
    if rule != "text":          # "text" caches keep their earlier names
        stamp = f"{rule}-{stamp}"
    vocab_file = cache_dir / f"vocab_{stamp}.json"
    if vocab_file.exists():
        vocab = json.loads(vocab_file.read_text())
    else:
        vocab = build_vocab(texts(), rule)
        atomic_write_json(vocab_file, vocab)
    if source is None:
        log(f"vocabulary: {len(vocab)} tokens ({vocab_file}); word vectors: not needed, the "
            f"embedding is the checkpoint's")
        return vocab, None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source)[-60:]
    emb_file = cache_dir / f"emb_{stamp}_{slug}.npy"
    vectors = np.load(emb_file) if emb_file.exists() else None
    if vectors is None or vectors.shape != (len(vocab), dim):
        # a cache of another WORD_EMBED_SIZE (or a damaged one) is computed again
        log(f"word vectors: computing {len(vocab)} vectors of size {dim} from {source}")
        vectors = word_vectors(source, list(vocab), dim)
        atomic_write(emb_file, lambda tmp: np.save(open(tmp, "wb"), vectors))
    log(f"vocabulary: {len(vocab)} tokens ({vocab_file}); word vectors: {source} ({emb_file})")
    log(coverage(vocab, vectors))
    return vocab, vectors


def coverage(vocab: dict[str, int], vectors: np.ndarray) -> str:
    """How many vocabulary words the source knows, as a log line. A word the source lacks
    has an all-zero row (GloVe, spaCy), which training then learns from zero."""
    found = np.any(vectors != 0, axis=1)
    special = {"PAD": PAD, "UNK": UNK, "CLS": CLS}
    words = [i for w, i in vocab.items() if w not in special]
    n = int(found[words].sum()) if words else 0
    share = 100.0 * n / max(len(words), 1)
    specials = ", ".join(f"{w} {'found' if found[i] else 'zero'}" for w, i in special.items()
                         if i < len(found))
    line = (f"word vectors: {n} of {len(words)} vocabulary words found ({share:.1f} %); "
            f"special tokens PAD/UNK/CLS take the source's vectors of those strings, as in the "
            f"original ({specials})")
    if words and share < 50:
        line += ("\nwarning: fewer than half of the words have a vector: is WORD_VECTORS the "
                 "right file (a cased 300-d GloVe text file, one word and its numbers a line)?")
    return line
