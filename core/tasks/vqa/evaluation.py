"""Official VQA-v2 accuracy, faithful to GT-Vision-Lab's *current* evaluation.

Reference: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(class ``VQAEval``) together with ``PythonHelperTools/vqaTools/vqa.py``
(``VQA.loadRes``).  The tables below hold the official entries and the
functions reproduce the official behaviour, quirks included, because a number
that is meant to be compared with published results must be computed exactly
the same way.

What the current code (after commit a013f00, "Fixed processing answers bug",
March 2021) does to one question, and what this module reproduces:

1. every answer, predicted and ground truth, has '\\n' and '\\t' replaced by
   a space and surrounding whitespace stripped;
2. only if these ten gt answers are not all the same string are the gt
   answers *and* the prediction passed through ``processPunctuation`` and
   ``processDigitArticle``; when the annotators agree, the stripped
   prediction must equal their answer exactly (``"no!"`` or ``"No"`` against
   ten ``"no"`` scores 0);
3. accuracy = mean over the ten leave-one-out subsets of
   min(1, #matches among the other nine / 3).

The copy shipped with MCAN / MMNas predates that commit: it normalised the
prediction always and the gt answers (punctuation only) on disagreement.
The official code is Python 2, so percentages are rounded half away from
zero (``round`` of Python 2), not half to even.

Usage::

    python3 eval_vqa.py --result R.json --questions Q.json --annotations A.json \
        [--subset] [--out metrics.json]
"""

import argparse
import json
import re
import sys
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

# --------------------------------------------------------------------------
# Tables, verbatim from VQAEval.__init__ (official vqaEval.py).
# --------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# Note (official quirks kept): "somebody'd" maps *to* "somebodyd", and the
# capitalised keys ("Im", "Ive", "Id've", "I'dve") can never match because
# processDigitArticle lower-cases the text before looking words up.

MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}

ARTICLES = ["a", "an", "the"]

PUNCT = [";", r"/", "[", "]", '"', "{", "}",
         "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]

# Verbatim from the official code.  "(?!<=\d)" is a typo for the lookbehind
# "(?<!\d)": as written it is a negative *lookahead* for the literal "<="
# followed by a digit, i.e. (almost) always true.  So a period is removed
# whenever it is not followed by a digit ("2.5" keeps its period, "5." not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


# --------------------------------------------------------------------------
# Answer normalisation
# --------------------------------------------------------------------------

def process_punctuation(text: str) -> str:
    """Official ``VQAEval.processPunctuation``.

    A punctuation mark that touches a space (or any punctuation at all when
    the text contains a digit-comma-digit group such as "1,000") is deleted;
    otherwise it is replaced by a space ("x-ray" -> "x ray").
    """
    out = text
    digit_group = _COMMA_STRIP.search(text) is not None    # the same for every mark
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or digit_group:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # Official quirk, kept on purpose: the code reads
    #     self.periodStrip.sub("", outText, re.UNICODE)
    # which passes re.UNICODE (== 32) as the *count* argument, so at most
    # 32 periods are stripped.  Spelled as a keyword here (same behaviour,
    # no DeprecationWarning on Python >= 3.13).
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """Official ``VQAEval.processDigitArticle``.

    Lower-cases, maps number words up to "ten" (and "none") to digits,
    drops articles, then restores apostrophes of known contractions.
    (The official code uses ``manualMap.setdefault``, which grows the map
    with identity entries; ``get`` gives the same result without mutation.)
    """
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    words = [CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words)


def _clean_whitespace(ans: str) -> str:
    """Official first step for every answer: '\\n', '\\t' -> ' ', strip."""
    return ans.replace("\n", " ").replace("\t", " ").strip()


def normalize_result_answer(ans: str) -> str:
    """The full official answer processing: whitespace, punctuation, digits,
    articles, contractions ("The two dogs.\\n" -> "2 dogs").

    The official evaluation applies the last two steps to the prediction
    (and the gt answers) only on questions whose gt answers disagree; see
    ``question_accuracy``.  Alone, this function says whether two answers
    mean the same (the demo generator uses it so).
    """
    return process_digit_article(process_punctuation(_clean_whitespace(ans)))


def prep_ans(ans: str) -> str:
    """MCAN/MMNas answer-vocabulary processing (``ans_punct.prep_ans``).

    Used to build the answer dictionary from training annotations; the
    trailing comma removal is a no-op after process_punctuation but is kept
    to match MCAN byte for byte.
    """
    return process_digit_article(process_punctuation(ans)).replace(",", "")


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

def question_accuracy(pred: str, gt_answers: list) -> float:
    """Accuracy of one predicted answer against the (usually 10) gt answers.

    Mirrors the per-question body of the current ``VQAEval.evaluate``:
    whitespace is cleaned on every answer; punctuation/digit/article
    processing is applied to the gt answers and the prediction only when the
    cleaned gt answers are not all equal.  Then the mean over every gt answer
    g of min(1, #(other gt answers == pred) / 3).  The official
    ``otherGTAns`` compares whole answer dicts, which differ by answer_id, so
    "other" means all gt answers but the one at that position.
    """
    if not gt_answers:
        raise ValueError("question_accuracy: gt_answers is empty")
    gts = [_clean_whitespace(g) for g in gt_answers]
    res = _clean_whitespace(pred)
    # When the annotators agree the official code compares the raw (only
    # stripped) strings: "no!" or "No" against ten "no" scores 0.
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        res = process_digit_article(process_punctuation(res))
    gt_acc = []
    for i in range(len(gts)):
        matching = sum(1 for j, g in enumerate(gts) if j != i and g == res)
        gt_acc.append(min(1, float(matching) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def round_half_away(x: float, ndigits: int = 2) -> float:
    """Python 2's ``round``, which the official (Python 2) code relies on.

    It rounds the exact binary value half away from zero (0.125 -> 0.13,
    2.675 -> 2.67 since 2.675 is stored as 2.67499...); Python 3's ``round``
    rounds half to even (0.125 -> 0.12).
    """
    step = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(step, rounding=ROUND_HALF_UP))


def _percent(accs: list) -> float:
    """Official ``setAccuracy`` formula with precision n=2."""
    return round_half_away(100 * float(sum(accs)) / len(accs), 2)


def _examples(ids, k=5) -> str:
    """A few ids for an error message."""
    ids = sorted(ids)
    more = f", ... ({len(ids)} in all)" if len(ids) > k else ""
    return ", ".join(str(i) for i in ids[:k]) + more


def _check_int_id(value, where: str) -> int:
    """Question ids are JSON integers in every official file."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer 'question_id', "
                         f"got {value!r}")
    return value


def _parse_results(data, source: str) -> dict:
    """Results (EvalAI list of {question_id, answer}, or qid->answer) -> dict."""
    if isinstance(data, Mapping):
        items = [(_check_int_id(q, f"{source}: key {q!r}"), a)
                 for q, a in data.items()]
    elif isinstance(data, list):
        items = []
        for i, entry in enumerate(data):
            where = f"{source}: result [{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected an object "
                                 f'{{"question_id": int, "answer": str}}, '
                                 f"got {type(entry).__name__}")
            for field in ("question_id", "answer"):
                if field not in entry:
                    raise ValueError(f"{where} lacks '{field}' (expected "
                                     f'{{"question_id": int, "answer": str}})')
            items.append((_check_int_id(entry["question_id"], where),
                          entry["answer"]))
    else:
        raise ValueError(f"{source}: expected a list of "
                         f'{{"question_id": int, "answer": str}} objects, '
                         f"got {type(data).__name__}")
    results = {}
    for qid, ans in items:
        if not isinstance(ans, str):
            raise ValueError(f"{source}: 'answer' of question {qid} must be a "
                             f"string, got {type(ans).__name__}")
        # The official loadRes silently keeps the last of duplicates; a
        # duplicate is almost always a bug in the result writer, so say so.
        if qid in results:
            raise ValueError(f"{source}: duplicate question_id {qid} in "
                             "results (each question must be answered once)")
        results[qid] = ans
    return results


def _parse_annotations(anns, source: str) -> list:
    """Validate the list under "annotations"; return it in file order."""
    if not isinstance(anns, list):
        raise ValueError(f"{source}: expected 'annotations' to be a list, "
                         f"got {type(anns).__name__}")
    seen = set()
    for i, ann in enumerate(anns):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise ValueError(f"{where}: expected an object, "
                             f"got {type(ann).__name__}")
        for field in ("question_id", "answers", "answer_type",
                      "question_type"):
            if field not in ann:
                raise ValueError(f"{where} lacks '{field}'")
        qid = _check_int_id(ann["question_id"], where)
        for field in ("answer_type", "question_type"):
            if not isinstance(ann[field], str):
                raise ValueError(f"{where}: expected '{field}' to be a "
                                 f"string, got {ann[field]!r}")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid}")
        seen.add(qid)
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, Mapping) and isinstance(a.get("answer"), str)
                for a in answers):
            raise ValueError(f"{where} (question {qid}): expected 'answers' "
                             'to be a non-empty list of {"answer": str}')
    return anns


def _select(results: dict, anns: list, allow_subset: bool) -> list:
    """Pair annotations with results, like ``VQA.loadRes``'s id check.

    The official tool asserts that the result ids equal the annotation ids;
    with allow_subset only the overlap is scored.
    """
    ann_ids = {a["question_id"] for a in anns}
    res_ids = set(results)
    missing, extra = ann_ids - res_ids, res_ids - ann_ids
    if not allow_subset and (missing or extra):
        parts = []
        if missing:
            parts.append(f"{len(missing)} annotated question(s) have no "
                         f"result (missing ids: {_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} result(s) are for questions not in "
                         f"the annotations (extra ids: {_examples(extra)})")
        raise ValueError(
            "results do not correspond to the annotated question set, as the "
            "official evaluation requires: " + "; ".join(parts) + ". Pass "
            "allow_subset=True (CLI: --subset) to score only the overlap.")
    chosen = [a for a in anns if a["question_id"] in res_ids]
    if not chosen:
        raise ValueError(f"no question id is both in the results "
                         f"({len(res_ids)} ids) and in the annotations "
                         f"({len(ann_ids)} ids); nothing to score")
    return chosen


def _score(results: dict, anns: list) -> dict:
    """Aggregate per question / answer type like ``VQAEval.setAccuracy``."""
    acc_all, per_ans, per_ques = [], {}, {}
    for ann in anns:
        acc = question_accuracy(results[ann["question_id"]],
                                [a["answer"] for a in ann["answers"]])
        acc_all.append(acc)
        per_ans.setdefault(ann["answer_type"], []).append(acc)
        per_ques.setdefault(ann["question_type"], []).append(acc)
    return {
        "overall": _percent(acc_all),
        "perAnswerType": {k: _percent(v) for k, v in per_ans.items()},
        "perQuestionType": {k: _percent(v) for k, v in per_ques.items()},
        "n_questions": len(acc_all),
    }


def evaluate(predictions, annotations, allow_subset=False) -> dict:
    """Official VQA accuracy of ``predictions`` on ``annotations``.

    predictions: list of {"question_id", "answer"} or dict qid -> answer.
    annotations: the list under "annotations" of v2_mscoco_*_annotations.json.
    Returns overall / perAnswerType / perQuestionType percentages (2 dp)
    and n_questions, the number of questions scored.
    """
    results = _parse_results(predictions, "predictions")
    anns = _parse_annotations(annotations, "annotations")
    return _score(results, _select(results, anns, allow_subset))


# --------------------------------------------------------------------------
# Files and CLI
# --------------------------------------------------------------------------

def _load_json(path, what: str):
    """json.load with an error that names the file and its role."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text: {e}") from e


def _list_field(data, key: str, path, what: str) -> list:
    """data[key] as a list, or a message naming file, field and expectation."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} file {path}: expected a JSON object with a "
                         f"'{key}' list, got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{what} file {path}: no '{key}' list (found keys: "
                         f"{sorted(data)})")
    if not isinstance(data[key], list):
        raise ValueError(f"{what} file {path}: expected '{key}' to be a list, "
                         f"got {type(data[key]).__name__}")
    return data[key]


def _question_ids(path) -> set:
    """Question ids of a v2_OpenEnded_mscoco_*_questions.json file.

    Only "questions" is required; unlike the official VQA class we do not
    need info/license/task_type.
    """
    questions = _list_field(_load_json(path, "questions"), "questions",
                            path, "questions")
    ids = set()
    for i, q in enumerate(questions):
        if not isinstance(q, Mapping) or "question_id" not in q:
            raise ValueError(f"questions file {path}: questions[{i}] lacks "
                             "'question_id'")
        ids.add(_check_int_id(q["question_id"],
                              f"questions file {path}: questions[{i}]"))
    return ids


def evaluate_files(result_path, questions_path, annotations_path,
                   allow_subset=False) -> dict:
    """Evaluate from the three official JSON files (see ``evaluate``)."""
    results = _parse_results(_load_json(result_path, "result"),
                             f"result file {result_path}")
    data = _load_json(annotations_path, "annotations")
    anns = _parse_annotations(
        _list_field(data, "annotations", annotations_path, "annotations"),
        f"annotations file {annotations_path}")
    unknown = {a["question_id"] for a in anns} - _question_ids(questions_path)
    if unknown:
        raise ValueError(
            f"{len(unknown)} question id(s) of annotations file "
            f"{annotations_path} are not in questions file {questions_path} "
            f"(e.g. {_examples(unknown)}); are they the same split?")
    return _score(results, _select(results, anns, allow_subset))


def format_table(metrics: dict) -> str:
    """Small text table: overall and per answer type."""
    lines = [f"questions scored: {metrics['n_questions']}",
             f"{'overall':<10}{metrics['overall']:>8.2f}"]
    for ans_type in ("yes/no", "number", "other"):
        if ans_type in metrics["perAnswerType"]:
            lines.append(
                f"{ans_type:<10}{metrics['perAnswerType'][ans_type]:>8.2f}")
    for ans_type, acc in sorted(metrics["perAnswerType"].items()):
        if ans_type not in ("yes/no", "number", "other"):
            lines.append(f"{ans_type:<10}{acc:>8.2f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Official VQA-v2 accuracy (GT-Vision-Lab vqaEval.py, "
                    "current version).")
    p.add_argument("--result", required=True,
                   help='result JSON: [{"question_id": int, "answer": str}]')
    p.add_argument("--questions", required=True,
                   help="v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", required=True,
                   help="v2_mscoco_*_annotations.json")
    p.add_argument("--subset", action="store_true",
                   help="score only questions present in both results and "
                        "annotations (the official tool requires all)")
    p.add_argument("--out", help="write the metrics as JSON to this path")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns 0, or 2 with 'error: ...' on bad input."""
    args = _parser().parse_args(argv)
    try:
        metrics = evaluate_files(args.result, args.questions,
                                 args.annotations, allow_subset=args.subset)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2)
                f.write("\n")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    return 0
