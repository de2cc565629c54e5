"""Configuration: every key declared once (type, default, comment); YAML and flags override.

Resolution order: declared defaults < ``cfgs/<task>.yml`` < ``cfgs/<task>_demo.yml`` (when
``--DATASET=demo``) < command line. A YAML file may hold top-level keys and two sections,
``search:`` and ``train:``, applied only to that kind of run. An unknown key or a value of
the wrong type is an error that names the key, where it came from and what was expected.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.ops import OPS

REPO = Path(__file__).resolve().parents[1]
CFG_DIR = REPO / "cfgs"


class ConfigError(ValueError):
    """A configuration value a user wrote is wrong; the message says which and why."""


@dataclass(frozen=True)
class Key:
    """One key: its type, default and meaning, what values are valid, and whether it
    defines the run (a ``--RESUME`` may not change it) or may change on a resume."""
    type: str      # 'int' | 'float' | 'str' | 'bool' | 'list[int]' | 'list[float]' | 'list[str]'
    default: Any
    doc: str
    optional: bool = False   # True: null (None) is a valid value
    # Valid values (for a list: of every item); checked wherever a value comes from.
    choices: tuple = ()                     # one of these
    min: float | None = None                # >= min
    max: float | None = None                # <= max
    above: float | None = None              # > above
    below: float | None = None              # < below
    form: tuple[str, str] | None = None     # (regex the whole string matches, in words)
    length: int | None = None               # a list of exactly this many items
    # False: a --RESUME may change it (it only extends the run, says where things are or how
    # fast they run); True: the saved value stays, a different one is refused.
    defines_run: bool = True

    def expected(self) -> str:
        """A valid value in words, e.g. "an int >= 1" or "one of 'full', 'two'"."""
        if not self.type.startswith("list["):
            return self.expected_item()
        return (f"a list of {f'{self.length} ' if self.length else ''}items, each "
                f"{self.expected_item()}")

    def expected_item(self) -> str:
        """A valid value (of a list: item) in words."""
        item = self.type[5:-1] if self.type.startswith("list[") else self.type
        if self.choices:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.form:
            what = self.form[1]
        else:
            bounds = [f"{op} {v}" for op, v in ((">=", self.min), (">", self.above),
                                                 ("<=", self.max), ("<", self.below))
                      if v is not None]
            what = f"{_article(item)} {item}" + "".join(
                f"{' ' if i == 0 else ' and '}{b}" for i, b in enumerate(bounds))
        return what

    def valid_item(self, value: Any) -> bool:
        if self.choices and value not in self.choices:
            return False
        if self.form and not re.fullmatch(self.form[0], value):
            return False
        return ((self.min is None or value >= self.min)
                and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))


def _article(type_name: str) -> str:
    return "an" if type_name[0] in "aeiou" else "a"


# Values several keys share.
OP_NAMES = tuple(OPS)        # the operator registry of core/ops.py
SPLITS_PLUS = (r"[\w-]+(\+[\w-]+)*", "split names joined by '+', e.g. 'train+val+vg'")
SPLITS_COMMA = (r"[\w-]+(,[\w-]+)*", "split names separated by commas, e.g. 'val,testA'")
BETAS = dict(length=2, min=0.0, below=1.0)


# Every configuration key, once. Grouped as a user reads them.
KEYS: dict[str, Key] = {
    # --- run -----------------------------------------------------------------------------
    "TASK": Key("str", "vqa", "task: vqa | vgd | itm (set by the script)",
                choices=("vqa", "vgd", "itm")),
    "RUN_MODE": Key("str", "train", "train | val | test (flag --RUN); a search only trains",
                    choices=("train", "val", "test")),
    # DATASET: the valid names belong to the task (its `datasets`); start() checks them.
    "DATASET": Key("str", "vqa", "dataset name; 'demo' selects the embedded synthetic data"),
    "VERSION": Key("str", "", "run name; the run folder is logs/<task>/<search|train>/<VERSION>; "
                   "empty: a timestamp",
                   form=(r"(?!\.\.?$)[^/\\]*", "a folder name without '/' (empty: a timestamp)"),
                   defines_run=False),      # names the folder: a renamed folder still resumes
    "SEED": Key("int", None, "random seed; null: drawn at random and recorded in config.yaml",
                optional=True, min=0, max=2**32 - 1),
    "GPU": Key("str", "0", "GPU ids, e.g. '0'; runs on CPU when no GPU is present",
               form=(r"\s*(\d+\s*(,\s*\d+\s*)*)?", "GPU ids separated by commas, e.g. '0' "
                     "or '0,1'"), defines_run=False),
    "NUM_WORKERS": Key("int", 2, "data-loader worker processes (flag --NW)", min=0,
                       defines_run=False),  # batches come in a fixed order whatever the count
    "DATA_ROOT": Key("str", "datasets", "root of the data tree (see datasets/README.md)",
                     defines_run=False),    # where the data are, not which
    "DATA_LAYOUT": Key("str", "auto", "layout of DATA_ROOT: 'ours' (datasets/README.md), "
                       "'original' (the original MMNas's data/ tree, used as it is) or 'auto' "
                       "(detected from its folders; the log says which)",
                       choices=("auto", "ours", "original"), defines_run=False),
    "LOG_ROOT": Key("str", "logs", "root of the run folders", defines_run=False),
    "THREADS": Key("int", 0, "CPU threads of this process (torch.set_num_threads); 0: torch's "
                   "default (the machine's cores); give each of several jobs on one machine "
                   "its share", min=0, defines_run=False),
    "KEEP_FREED_MEMORY": Key("bool", True, "CPU: glibc's malloc keeps freed memory for the "
                             "next step instead of mapping large blocks afresh (page faults "
                             "were a quarter of a CPU step; utils/allocator.py); false: the "
                             "system's default", defines_run=False),
    "CKPT_KEEP": Key("int", 2, "checkpoints kept: the newest N (a resume needs the newest and "
                     "the one it falls back to if that is damaged: N >= 2) plus, in a "
                     "training, the best epoch's; 0: keep all", min=0, defines_run=False),
    "TENSORBOARD": Key("bool", False, "also write the per-epoch records as TensorBoard events "
                       "(<run folder>/tensorboard/; needs the tensorboard package)",
                       defines_run=False),
    "RESUME": Key("bool", False, "continue the run named by --VERSION exactly, from its last "
                  "checkpoint (or --CKPT_PATH); "
                  "only MAX_EPOCH, NUM_WORKERS, GPU, DATA_ROOT, DATA_LAYOUT, LOG_ROOT, VERSION, "
                  "THREADS, KEEP_FREED_MEMORY, CKPT_KEEP, TENSORBOARD, CKPT_PATH and "
                  "TEST_SPLIT may differ from the saved config", defines_run=False),
    "CKPT_PATH": Key("str", "", "checkpoint to load: ours or the original's released format; "
                     "in a search, a supernet to warm-start from (weights and alphas); "
                     "with --RESUME the checkpoint to continue from",
                     defines_run=False),
    "ARCH_PATH": Key("str", "", "architecture JSON for training (see arch/)"),
    "ARCH_EPOCH": Key("int", 0, "which 'epochN' key of ARCH_PATH to train (alias --GENO_EPOCH)",
                      min=0),
    "TRAIN_SPLIT": Key("str", "train", "training splits joined by '+', e.g. train+val+vg "
                       "(flag --SPLIT)", form=SPLITS_PLUS),
    "EVAL_SPLIT": Key("str", "val", "split(s) evaluated after each epoch and by --RUN=val; "
                      "several with commas, e.g. val,testA,testB", form=SPLITS_COMMA),
    "TEST_SPLIT": Key("str", "test", "split(s) answered by --RUN=test, comma-separated",
                      form=SPLITS_COMMA, defines_run=False),   # a training run never reads it
    "EVAL_EVERY_EPOCH": Key("bool", True, "evaluate EVAL_SPLIT after each epoch when it is not "
                            "in TRAIN_SPLIT"),
    "PICTURES": Key("bool", True, "draw the run's pictures (pictures/*.png) after every epoch; "
                    "pictures/history.json is written either way", defines_run=False),
    "AMP": Key("str", "off", "mixed precision for search, training and evaluation: off | bf16 "
               "| fp16 (fp16 with loss scaling; bf16 also on CPUs with bf16 units)",
               choices=("off", "bf16", "fp16")),
    "BUCKET_BATCHES": Key("str", "off", "training batches of samples with similar region counts "
                          "(less padding; needs a packed feature store): off | on",
                          choices=("off", "on")),
    "COMPILE": Key("str", "off", "torch.compile (inductor) the network for search, training and "
                   "evaluation: off | on (eager when no compiler is found; see core/compile.py)",
                   choices=("off", "on"), defines_run=False),
    "SUBSET": Key("int", 0, "use only the first N samples of every split (0: all); for quick tries",
                  min=0),
    # --- data --------------------------------------------------------------------------------
    # The original's spaCy 2 en_vectors_web_lg is GloVe 840B: read the same file directly.
    "WORD_VECTORS": Key("str", "glove:datasets/glove/glove.840B.300d.txt",
                        "word-vector source: 'glove:<path>' (glove.840B.300d.txt, 5.6 GB, from "
                        "nlp.stanford.edu/projects/glove), 'spacy:<model>' (spaCy 3: "
                        "en_core_web_lg, not the original's GloVe), or 'hash' (deterministic "
                        "per-word vectors, offline); not read when --RUN=val/test evaluates a "
                        "--CKPT_PATH",
                        form=(r"hash|spacy:\S+|glove:.+", "'spacy:<model>', 'glove:<path>' or "
                              "'hash'")),
    "MAX_TOKEN": Key("int", 14, "text tokens per sample (longer texts are cut)", min=1),
    "MAX_REGIONS": Key("int", 100, "image regions per sample (more are cut)", min=1),
    "ANSWER_DICT": Key("str", "", "VQA answer vocabulary [ans_to_ix, ix_to_ans]; empty: built "
                       "from train+val annotations (answers occurring > ANS_MIN_COUNT-1 times)"),
    "ANS_MIN_COUNT": Key("int", 9, "VQA: keep answers occurring at least this often (> 8)",
                         min=1),
    "ITM_NEG_CANDIDATES": Key("int", 64, "ITM: random candidates scored per image and per "
                              "caption when mining hard negatives", min=1),
    "ITM_HARD_NEG_EPOCH": Key("int", 0, "ITM: first (0-based) epoch with mined hard negatives; "
                              "earlier epochs draw random negatives (0: mine from the start, "
                              "as the original)", min=0),
    "ITM_NEG_TOPK": Key("int", 5, "ITM: hardest candidates kept; each sample draws one "
                        "(at most ITM_NEG_CANDIDATES)", min=1),
    "ITM_POS_TWICE": Key("bool", True, "ITM: count the positive pair's BCE twice, as the "
                         "original does"),
    "ITM_LOSS": Key("str", "bce", "ITM: 'bce' (the original's default) or 'margin' (the "
                    "original's other loss: hinge 0.2 between the positive's and each "
                    "negative's matching probability)", choices=("bce", "margin")),
    # --- model -------------------------------------------------------------------------------
    "HSIZE": Key("int", 512, "hidden size H", min=1),
    "WORD_EMBED_SIZE": Key("int", 300, "word-vector size", min=1),
    "IMG_FEAT_SIZE": Key("int", 2048, "region feature size", min=1),
    "REL_SIZE": Key("int", 64, "relation embedding size (Linear(4 -> REL_SIZE) + ReLU)", min=1),
    "DROPOUT_R": Key("float", 0.1, "dropout rate", min=0.0, below=1.0),
    "FLAT_MLP_SIZE": Key("int", 512, "AttFlat MLP hidden size", min=1),
    "FLAT_GLIMPSES": Key("int", 1, "AttFlat glimpses", min=1),
    "ENC_BLOCKS": Key("int", 12, "encoder blocks (text)", min=1),
    "DEC_BLOCKS": Key("int", 18, "decoder blocks (image, guided by text)", min=1),
    # --- optimisation ------------------------------------------------------------------------
    "BATCH_SIZE": Key("int", 64, "batch size (flag --BS)", min=1),
    "EVAL_BATCH_SIZE": Key("int", 0, "evaluation batch size; 0: same as BATCH_SIZE", min=0),
    # The schedule does not depend on MAX_EPOCH: a resume may extend (or end) a run.
    "MAX_EPOCH": Key("int", 13, "epochs", min=1, defines_run=False),
    "LR_BASE": Key("float", 1.2e-4, "base learning rate", above=0.0),
    "LR_WARMUP_EPOCHS": Key("int", 3, "warm-up epochs: lr x 1/(W+1), 2/(W+1), ...", min=0),
    "LR_DECAY_EPOCHS": Key("list[int]", [10, 12], "0-based epochs at whose start lr is "
                           "multiplied by LR_DECAY_RATE (the original's LR_DECAY_LIST)", min=0),
    "LR_DECAY_RATE": Key("float", 0.2, "learning-rate decay factor", above=0.0, max=1.0),
    "OPT_BETAS": Key("list[float]", [0.9, 0.98], "Adam betas", **BETAS),
    "OPT_EPS": Key("float", 1e-9, "Adam eps", above=0.0),
    "GRAD_CLIP": Key("float", 1.0, "gradient-norm clip; 0: off", min=0.0),
    # --- search ------------------------------------------------------------------------------
    "ENC_CANDIDATES": Key("list[str]", ["self_att_64", "feed_forward"], "search space, encoder",
                          choices=OP_NAMES),
    "DEC_CANDIDATES": Key("list[str]", ["self_att_64", "rel_self_att_64", "guided_att_64",
                                        "feed_forward"], "search space, decoder",
                          choices=OP_NAMES),
    "ENC_PRIOR": Key("list[str]", ["self_att_64", "feed_forward"],
                     "alpha prior, repeated over the encoder blocks (+1 its op, -1 others); "
                     "ops of ENC_CANDIDATES", choices=OP_NAMES),
    "DEC_PRIOR": Key("list[str]", ["rel_self_att_64", "guided_att_64", "feed_forward"],
                     "alpha prior, repeated over the decoder blocks; ops of DEC_CANDIDATES",
                     choices=OP_NAMES),
    "PRIOR_LOGIT": Key("float", 1.0, "how strongly the search starts at its prior: the prior's op "
                       "gets alpha +v, the others -v (the original: 1; then the prior's op is "
                       "drawn 71 % of the time in a decoder block)", above=0.0),
    "ARCH_SPLIT_RATIO": Key("float", 0.8, "search: first part of the train split for weights, "
                            "the rest (fixed order) for the architecture", above=0.0, below=1.0),
    "ARCH_EVAL_SAMPLES": Key("int", 0, "search: score the arg-max network on the first N samples "
                             "of the architecture split after each epoch (0: all of it)", min=0),
    "ARCH_MODE": Key("str", "full", "architecture gradient: 'full' (all candidates) | 'two'",
                     choices=("full", "two")),
    "ARCH_LR": Key("float", 0.1, "architecture (alpha) learning rate", above=0.0),
    "ARCH_BETAS": Key("list[float]", [0.0, 0.999], "architecture Adam betas", **BETAS),
    "ARCH_START_EPOCH": Key("int", 20, "first 0-based epoch with architecture steps",
                            min=0),
    "ARCH_STEP_EVERY": Key("int", 5, "one architecture step every N weight steps", min=1),
}


class Config:
    """Resolved configuration: attribute access, read-only after ``freeze()``."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_frozen", False)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no config key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError("config is frozen")
        self._values[name] = check_value(name, value, "code")

    def freeze(self) -> "Config":
        object.__setattr__(self, "_frozen", True)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The run's settings, as config.yaml and checkpoints keep them. RESUME says how a
        command continues the run, not what the run is: a resumed run's files equal those
        of the uninterrupted one."""
        return {**copy.deepcopy(self._values), "RESUME": False}

    def dump(self) -> str:
        """config.yaml: the run's settings (``to_dict``)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def eval_batch_size(self) -> int:
        return self.EVAL_BATCH_SIZE or self.BATCH_SIZE


def check_value(name: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits the declared type of ``name`` (ints accepted as floats)."""
    if name not in KEYS:
        raise ConfigError(f"{source}: unknown config key {name!r}; "
                          f"close matches: {close_keys(name)}")
    key = KEYS[name]
    if value is None and key.optional:
        return None
    ok, fixed = _fits(key.type, value)
    if not ok:
        raise ConfigError(f"{source}: {name} = {value!r} is not {_article(key.type)} {key.type}"
                          f"{' or null' if key.optional else ''} ({key.doc})")
    if not key.type.startswith("list["):
        if not key.valid_item(fixed):
            raise ConfigError(f"{source}: {name} = {value!r} is not {key.expected()} "
                              f"({key.doc})")
        return fixed
    if key.length is not None and len(fixed) != key.length:
        raise ConfigError(f"{source}: {name} = {value!r} is not {key.expected()} ({key.doc})")
    bad = [v for v in fixed if not key.valid_item(v)]
    if bad:
        raise ConfigError(f"{source}: {name} = {value!r}: {bad[0]!r} is not "
                          f"{key.expected_item()} ({key.doc})")
    return fixed


def _fits(type_: str, value: Any) -> tuple[bool, Any]:
    if type_.startswith("list["):
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_fits(type_[5:-1], v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if type_ == "bool":
        return isinstance(value, bool), value
    if type_ == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if type_ == "float":
        if isinstance(value, str):       # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if type_ == "str":
        return isinstance(value, str), value
    raise AssertionError(type_)


def close_keys(name: str) -> str:
    """Up to three declared keys spelt like ``name`` (for 'unknown key' errors)."""
    return ", ".join(difflib.get_close_matches(name, KEYS, n=3)) or "none"


def read_yaml(path: Path, section: str) -> dict[str, Any]:
    """Top-level keys of a YAML file plus its ``section`` ('search' or 'train')."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of KEY: value")
    merged = {k: v for k, v in data.items() if k not in ("search", "train")}
    extra = data.get(section) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: section {section!r} must be a mapping of KEY: value")
    merged.update(extra)
    return merged


def _shown(path: Path) -> str:
    """``cfgs/vqa.yml`` for the repository's own files, the full path otherwise."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def parse_flag_value(text: str) -> Any:
    """A command-line value as YAML would read it ('2' -> 2, '[10,12]' -> list, 'true')."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve(task: str, kind: str, overrides: dict[str, Any]) -> Config:
    """Build the config of a ``kind`` ('search' | 'train') run of ``task``.

    ``overrides`` come from the command line (already parsed to Python values); the
    dataset they name decides whether the demo YAML applies.
    """
    values = {name: copy.deepcopy(key.default) for name, key in KEYS.items()}
    values["TASK"] = task
    dataset = overrides.get("DATASET", values["DATASET"])
    layers = [CFG_DIR / f"{task}.yml"]
    if dataset == "demo":
        layers.append(CFG_DIR / f"{task}_demo.yml")
    for path in layers:
        if path.exists():
            for name, value in read_yaml(path, kind).items():
                values[name] = check_value(name, value, _shown(path))
    for name, value in overrides.items():
        values[name] = check_value(name, value, "command line")
    check_together(values, task, kind)
    return Config(values)


def check_together(values: dict[str, Any], task: str, kind: str) -> None:
    """Rules between keys (each key alone is valid already); the first broken one is an error
    that names the keys, their values and what to change."""
    script = f"{kind}_{task}.py"
    if values["TASK"] != task:
        raise ConfigError(f"TASK = {values['TASK']!r}, but {script} runs {task!r} (TASK is set "
                          f"by the script)")
    if values["ITM_NEG_TOPK"] > values["ITM_NEG_CANDIDATES"]:
        raise ConfigError(f"ITM_NEG_TOPK = {values['ITM_NEG_TOPK']} is more than "
                          f"ITM_NEG_CANDIDATES = {values['ITM_NEG_CANDIDATES']}: expected the "
                          f"hardest ones kept at most the candidates scored")
    if values["CKPT_KEEP"] == 1:
        raise ConfigError("CKPT_KEEP = 1: expected 0 (keep all) or at least 2 (the newest "
                          "checkpoint and the one a --RESUME falls back to if it is damaged)")
    if kind == "search":
        _check_search(values, script)


def _check_search(values: dict[str, Any], script: str) -> None:
    if values["RUN_MODE"] != "train":
        raise ConfigError(f"RUN_MODE = {values['RUN_MODE']!r}: {script} only searches "
                          f"(expected 'train'); evaluate a trained checkpoint with "
                          f"{script.replace('search_', 'train_')} --RUN={values['RUN_MODE']} "
                          f"--CKPT_PATH=...")
    if values["ARCH_PATH"]:
        raise ConfigError(f"ARCH_PATH = {values['ARCH_PATH']!r}: {script} does not read it "
                          f"(expected empty); a search searches ENC_CANDIDATES / "
                          f"DEC_CANDIDATES (warm-start it from a supernet with --CKPT_PATH)")
    for side in ("ENC", "DEC"):
        candidates, prior = values[f"{side}_CANDIDATES"], values[f"{side}_PRIOR"]
        if not candidates:
            raise ConfigError(f"{side}_CANDIDATES = []: expected at least one operator")
        stray = [op for op in prior if op not in candidates]
        if stray:
            raise ConfigError(f"{side}_PRIOR = {prior!r}: {stray[0]!r} is not in "
                              f"{side}_CANDIDATES = {candidates!r}; expected prior ops among "
                              f"the candidates (or {side}_PRIOR=[] for no prior)")


def read_saved(path: Path) -> dict[str, Any]:
    """A run folder's ``config.yaml``: its known keys, each checked (keys a later version
    dropped are ignored)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of KEY: value")
    return {k: check_value(k, v, str(path)) for k, v in data.items() if k in KEYS}


def resume_changes(saved: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """``'KEY: saved X, new Y'`` for every run-defining key that ``overrides`` changes."""
    changed = []
    for name, value in overrides.items():
        if KEYS[name].defines_run and name in saved:
            new = check_value(name, value, "command line")
            if new != saved[name]:
                changed.append(f"{name}: saved {saved[name]!r}, new {new!r}")
    return changed
