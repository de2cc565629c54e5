"""Word vectors: the GloVe default, one-line errors saying where to put the file, the
coverage line of the log, and evaluating a checkpoint without any word vectors."""
import sys
import types

import numpy as np
import pytest

from core.config import resolve
from core.data.text import PAD, WordVectorError, cached_vocab_and_vectors, coverage, word_vectors
from core.run import main, start
from core.tasks.vqa import VQATask
from core.train import run_train
from tinyvqa import train_tiny


def test_default_is_the_glove_file_under_datasets():
    assert resolve("vqa", "train", {}).WORD_VECTORS == "glove:datasets/glove/glove.840B.300d.txt"
    assert resolve("vgd", "search", {}).WORD_VECTORS.startswith("glove:")
    assert resolve("vqa", "train", {"DATASET": "demo"}).WORD_VECTORS == "hash"


def test_missing_glove_file_says_where_to_get_it(tmp_path):
    with pytest.raises(WordVectorError) as e:
        word_vectors(f"glove:{tmp_path}/glove.840B.300d.txt", ["the"])
    msg = str(e.value)
    assert f"WORD_VECTORS=glove:{tmp_path}/glove.840B.300d.txt: no such file" in msg
    assert "https://nlp.stanford.edu/projects/glove/" in msg and "5.6 GB unzipped" in msg
    assert "datasets/glove/" in msg and "spacy:en_core_web_lg" in msg and "\n" not in msg


def test_spacy_missing_or_without_vectors_is_a_word_vector_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)        # import spacy -> ImportError
    with pytest.raises(WordVectorError, match="spaCy cannot be imported"):
        word_vectors("spacy:en_core_web_lg", ["the"])

    def load(name):
        if name == "en_vectors_web_lg":
            raise OSError(f"[E050] Can't find model '{name}'.\nmore lines")
        vectors = types.SimpleNamespace(shape=(0, 0))       # a small model: no vectors
        return types.SimpleNamespace(vocab=types.SimpleNamespace(vectors=vectors))
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    with pytest.raises(WordVectorError) as e:
        word_vectors("spacy:en_vectors_web_lg", ["the"])
    assert "'en_vectors_web_lg' is not installed ([E050] Can't find model" in str(e.value)
    assert "spaCy 2 only" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WordVectorError, match="the model has no word vectors, expected 300-d"):
        word_vectors("spacy:en_core_web_sm", ["the"])


def test_a_cache_of_another_embedding_size_is_computed_again(tmp_path):
    corpus = tmp_path / "questions.txt"
    corpus.write_text("what color is the bus\n")
    lines = []

    def vectors(dim):
        return cached_vocab_and_vectors(tmp_path / "cache", [corpus], lambda: ["what color"],
                                        "hash", dim, lines.append)[1]

    assert vectors(300).shape[1] == 300
    assert vectors(16).shape[1] == 16            # not the 300-d cache: a shape error later
    assert sum("computing" in line for line in lines) == 2
    assert vectors(16).shape[1] == 16 and sum("computing" in line for line in lines) == 2


def test_coverage_counts_words_with_a_vector():
    vocab = {"PAD": 0, "UNK": 1, "CLS": 2, "the": 3, "cat": 4, "zxq": 5, "dog": 6}
    vectors = np.ones((7, 3), np.float32)
    vectors[[PAD, 5]] = 0                                   # 'PAD' and 'zxq' not in the source
    line = coverage(vocab, vectors)
    assert line.startswith("word vectors: 3 of 4 vocabulary words found (75.0 %); ")
    assert "(PAD zero, UNK found, CLS found)" in line and "warning" not in line
    vectors[3:] = 0
    assert "0 of 4 vocabulary words found (0.0 %)" in coverage(vocab, vectors)
    assert "\nwarning: fewer than half of the words have a vector" in coverage(vocab, vectors)


def test_glove_coverage_goes_into_the_log(vqa_val_root, vqa_task, tmp_path):
    root, _ = vqa_val_root
    glove = tmp_path / "glove.txt"
    glove.write_text("what 0.1 0.2 0.3\nis 0.5 0.5 0.5\nUNK 1 1 1\n")
    task = vqa_task(root, WORD_VECTORS=f"glove:{glove}", WORD_EMBED_SIZE=3)
    task.prepare()
    line = next(m for m in task.lines if m.startswith("word vectors: 2 of "))
    words = len(task.vocab) - 3
    assert f"2 of {words} vocabulary words found ({100 * 2 / words:.1f} %)" in line
    assert "(PAD zero, UNK found, CLS zero)" in line
    np.testing.assert_allclose(task.word_vectors[task.vocab["what"]], [0.1, 0.2, 0.3])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("wv")
    return train_tiny(base)


def test_evaluating_a_checkpoint_reads_no_word_vectors(trained, tmp_path, capsys):
    flags, ckpt = trained
    absent = f"--WORD_VECTORS=glove:{tmp_path}/absent.txt"
    cfg, run, task = start(VQATask, "train", [*flags, absent, "--RUN=val",
                                              f"--CKPT_PATH={ckpt}", "--VERSION=nowv"])
    results = run_train(cfg, task, run)
    assert task.word_vectors is None and "overall" in results["val"]
    log = (run.folder / "log.txt").read_text()
    assert "word vectors: not needed, the embedding is the checkpoint's" in log
    assert (run.folder / "result_val_tiny_epoch1.json").is_file()


def test_training_without_the_glove_file_stops_with_one_line(trained, tmp_path, capsys,
                                                             monkeypatch):
    flags, _ = trained
    monkeypatch.setattr(sys, "argv", ["train_vqa.py"])
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, [*flags, "--ARCH_PATH=arch/mmnas_vqa.json",
                                           f"--WORD_VECTORS=glove:{tmp_path}/absent.txt",
                                           "--VERSION=nofile"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: WORD_VECTORS=glove:{tmp_path}/absent.txt: no such file; "
                          f"download glove.840B.300d.zip")
