"""Visual question answering on VQA-v2 (+ Visual Genome): data, head, loss, metric."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from core.config import REPO
from core.data.features import open_features, pad_regions
from core.data.npz import COCO_FEATURE_NAMES
from core.data.text import cached_vocab_and_vectors, encode, files_stamp
from core.model import PooledFusionHead
from core.tasks.base import Task, entries_of
from utils.io import atomic_write_json, expect_fields, read_json
from core.tasks.vqa.evaluation import evaluate, prep_ans, question_accuracy

QUESTIONS = {
    "train": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
    "vg": "VG_questions.json",
}
ANNOTATIONS = {
    "train": "v2_mscoco_train2014_annotations.json",
    "val": "v2_mscoco_val2014_annotations.json",
    "vg": "VG_annotations.json",
}
# Visual Genome questions reuse COCO images, so their features live in the COCO folders.
FEATURE_DIRS = {"train": ["train2014"], "val": ["val2014"], "test": ["test2015"],
                "test-dev": ["test2015"], "vg": ["train2014", "val2014"]}
VOCAB_SPLITS = ("train", "val", "test", "vg")   # the original's vocabulary corpus, in order


def soft_score(count: int) -> float:
    """Annotator agreement -> target: 0, 0.3, 0.6, 0.9, then 1 from four annotators on."""
    return min(1.0, 0.3 * count) if count < 4 else 1.0


class VQADataset(Dataset):
    """Questions of one or more splits; features read per item, targets built per item."""

    def __init__(self, entries: list[dict], feats, vocab, ans_to_ix, cfg):
        self.entries, self.feats = entries, feats
        self.vocab, self.ans_to_ix = vocab, ans_to_ix
        self.max_token, self.max_regions = cfg.MAX_TOKEN, cfg.MAX_REGIONS

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        img, boxes, _ = self.feats.load(e["image_id"], self.max_regions)
        item = {"txt": encode(e["question"], self.vocab, self.max_token), "img": img,
                "boxes": boxes, "qid": e["question_id"]}
        if e.get("answers") is not None:
            counts = Counter(prep_ans(a) for a in e["answers"])
            pairs = [(self.ans_to_ix[a], soft_score(c)) for a, c in counts.items()
                     if a in self.ans_to_ix]
            item["ans_idx"] = np.array([p[0] for p in pairs], np.int64)
            item["ans_score"] = np.array([p[1] for p in pairs], np.float32)
        return item


class VQATask(Task):
    name = "vqa"
    headline = "overall"
    datasets = ("vqa", "demo")
    batch_ids = ("qid", "question ids")
    original_key_prefixes = PooledFusionHead.ORIGINAL_KEY_PREFIXES

    @property
    def root(self) -> Path:
        """The folder of the question and annotation files (``vqa/annotations`` in the
        original's tree)."""
        return self.data_paths.text

    @property
    def cache(self) -> Path:
        return Path(self.cfg.DATA_ROOT) / "vqa" / "cache"     # the same in both layouts

    def _feature_root(self) -> Path:
        return self.data_paths.features

    # --- vocabularies ------------------------------------------------------------------
    def prepare(self, word_vectors: bool = True) -> None:
        files = [self.root / QUESTIONS[s] for s in VOCAB_SPLITS if (self.root / QUESTIONS[s])
                 .is_file()]
        if not files:
            raise FileNotFoundError(f"no VQA question files in {self.root} (expected e.g. "
                                    f"{QUESTIONS['train']}); see dataset_setup.md")
        if len(files) < len(VOCAB_SPLITS):
            self.log(f"note: vocabulary built from {[f.name for f in files]}; released "
                     f"checkpoints need all of {[QUESTIONS[s] for s in VOCAB_SPLITS]}")

        def texts():
            for f in files:
                for q in _questions(f):
                    yield q["question"]

        self.vocab, self.word_vectors = cached_vocab_and_vectors(
            self.cache, files, texts, self.word_vector_source(word_vectors),
            self.cfg.WORD_EMBED_SIZE, self.log)
        self.ans_to_ix, self.ix_to_ans = self._answer_dict()
        self.log(f"answers: {len(self.ans_to_ix)}")

    def _answer_dict(self) -> tuple[dict[str, int], list[str]]:
        path = self.cfg.ANSWER_DICT
        if path:
            file = Path(path) if Path(path).is_absolute() else REPO / path
            data = read_json(file, "answer dictionary")
            if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], dict)):
                raise ValueError(f"{file}: expected [ans_to_ix, ix_to_ans]")
            ans_to_ix = {a: int(i) for a, i in data[0].items()}
        else:
            sources = [self.root / ANNOTATIONS[s] for s in ("train", "val")]
            stamp = files_stamp([f for f in sources if f.exists()])
            cache = self.cache / f"answer_dict_{stamp}_min{self.cfg.ANS_MIN_COUNT}.json"
            if cache.exists():
                ans_to_ix = read_json(cache, "answer dictionary")[0]
            else:
                ans_to_ix = self._count_answers()
                atomic_write_json(cache, [ans_to_ix, {str(i): a for a, i in ans_to_ix.items()}])
        ix_to_ans = [""] * len(ans_to_ix)
        for a, i in ans_to_ix.items():
            ix_to_ans[i] = a
        return ans_to_ix, ix_to_ans

    def _count_answers(self) -> dict[str, int]:
        """Processed ``multiple_choice_answer`` of train+val, frequent ones, first-seen order."""
        counts: Counter = Counter()
        for split in ("train", "val"):
            file = self.root / ANNOTATIONS[split]
            for a in _annotations(file).values():
                counts[prep_ans(a["multiple_choice_answer"])] += 1
        kept = [a for a in counts if counts[a] >= self.cfg.ANS_MIN_COUNT]
        return {a: i for i, a in enumerate(kept)}

    # --- datasets ----------------------------------------------------------------------
    def dataset(self, split: str) -> VQADataset:
        entries, dirs, needed = [], [], {}
        for part in split.split("+"):
            if part not in QUESTIONS:
                raise ValueError(f"unknown VQA split {part!r} in {split!r}; valid: "
                                 f"{', '.join(QUESTIONS)}")
            q_file = self.root / QUESTIONS[part]
            questions = _questions(q_file)
            anns = _annotations(self.root / ANNOTATIONS[part]) if part in ANNOTATIONS else None
            if self.cfg.SUBSET:
                questions = questions[:self.cfg.SUBSET]
            for q in questions:
                ann = None
                if anns is not None:
                    ann = anns.get(q["question_id"])
                    if ann is None:
                        raise ValueError(f"{self.root / ANNOTATIONS[part]}: no annotation for "
                                         f"question_id {q['question_id']} of {q_file.name}")
                entries.append({**q, "answers": [a["answer"] for a in ann["answers"]]
                                if ann else None, "annotation": ann})
                needed.setdefault(q["image_id"], f"question {q['question_id']} in {q_file}")
            dirs += [self._feature_root() / d for d in FEATURE_DIRS[part] if
                     self._feature_root() / d not in dirs]
        feats = open_features(dirs, self.cfg.IMG_FEAT_SIZE, COCO_FEATURE_NAMES)
        feats.check(needed)
        return VQADataset(entries, feats, self.vocab, self.ans_to_ix, self.cfg)

    def collate(self, samples: list[dict]) -> dict:
        batch = {"txt": torch.from_numpy(np.stack([s["txt"] for s in samples])),
                 "img": torch.from_numpy(pad_regions([s["img"] for s in samples],
                                                     self.cfg.IMG_FEAT_SIZE)),
                 "boxes": torch.from_numpy(pad_regions([s["boxes"] for s in samples], 4)),
                 "qid": [s["qid"] for s in samples]}
        if "ans_idx" in samples[0]:
            target = torch.zeros(len(samples), len(self.ans_to_ix))
            for i, s in enumerate(samples):
                target[i, torch.from_numpy(s["ans_idx"])] = torch.from_numpy(s["ans_score"])
            batch["target"] = target
        return batch

    # --- model -------------------------------------------------------------------------
    def build_head(self) -> nn.Module:
        return PooledFusionHead(self.cfg, len(self.ans_to_ix))

    def model_meta(self) -> dict:
        return {**super().model_meta(), "answer_size": len(self.ans_to_ix),
                "answers": list(self.ix_to_ans)}

    def loss(self, out, batch):
        return F.binary_cross_entropy_with_logits(out, batch["target"], reduction="sum")

    # --- evaluation --------------------------------------------------------------------
    def predict(self, out, batch) -> list[dict]:
        best = out.argmax(-1).tolist()
        return [{"question_id": q, "answer": self.ix_to_ans[i]}
                for q, i in zip(batch["qid"], best)]

    def metric(self, predictions, dataset: VQADataset) -> dict:
        annotations = _annotations_of(dataset)
        return evaluate(predictions, annotations) if annotations else {}

    def write_predictions(self, predictions, folder: Path, split: str) -> Path:
        path = folder / f"result_{split}.json"
        atomic_write_json(path, [{"question_id": int(p["question_id"]), "answer": p["answer"]}
                                 for p in predictions])
        return path

    def baseline(self, train: VQADataset, evaluated: VQADataset) -> dict:
        annotations = _annotations_of(evaluated)
        if not annotations:
            return {}
        answer, accuracy = majority_baseline(_annotations_of(train), annotations)
        return {"majority_answer": answer, "majority_overall": round(accuracy, 2)}

    def attention_reading(self, output, batch, att):
        """The top 5 answers with their sigmoid scores, and the annotators' answers."""
        scores = torch.sigmoid(output[0].float())
        top = torch.topk(scores, min(5, len(scores)))
        lines = ["answer (top 5, sigmoid score):"] + [
            f"  {self.ix_to_ans[i]:<14} {s:.3f}" for s, i in zip(top.values.tolist(),
                                                               top.indices.tolist())]
        truth = self._true_answers(batch)
        return lines + (["true (annotators):"] + truth if truth else []), {}, att["img"][0].numpy()

    def _true_answers(self, batch) -> list[str]:
        if "target" not in batch:
            return []
        target = batch["target"][0]
        order = torch.argsort(-target)[:5]
        return [f"  {self.ix_to_ans[i]:<14} {target[i]:.2f}" for i in order.tolist()
                if target[i] > 0]


def majority_baseline(train_annotations: list[dict],
                      evaluated_annotations: list[dict]) -> tuple[str, float]:
    """The most frequent train ``multiple_choice_answer`` (ties: the first alphabetically) and
    its VQA accuracy in percent on the evaluated annotations (0 when there are none)."""
    counts = Counter(prep_ans(a["multiple_choice_answer"]) for a in train_annotations)
    answer = min(counts, key=lambda a: (-counts[a], a))
    if not evaluated_annotations:
        return answer, 0.0
    accs = [question_accuracy(answer, [x["answer"] for x in a["answers"]])
            for a in evaluated_annotations]
    return answer, 100.0 * sum(accs) / len(accs)


def _annotations_of(dataset) -> list[dict]:
    return [e["annotation"] for e in entries_of(dataset) if e.get("annotation")]


# --- file readers with errors that name the file and the field -----------------------

def _questions(path: Path) -> list[dict]:
    data = read_json(path, "VQA questions")
    qs = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(qs, list):
        raise ValueError(f"{path}: expected an object with a 'questions' list")
    for i, q in enumerate(qs):
        expect_fields(path, f"questions[{i}]", q, {"image_id": int, "question": str,
                                             "question_id": int})
    return qs


def _annotations(path: Path) -> dict[int, dict]:
    data = read_json(path, "VQA annotations")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected an object with an 'annotations' list")
    out = {}
    for i, a in enumerate(anns):
        expect_fields(path, f"annotations[{i}]", a, {"question_id": int, "image_id": int,
                                               "multiple_choice_answer": str, "answers": list,
                                               "answer_type": str})
        for j, ans in enumerate(a["answers"]):
            expect_fields(path, f"annotations[{i}].answers[{j}]", ans, {"answer": str})
        out[a["question_id"]] = a
    return out
