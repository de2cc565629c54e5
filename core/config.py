"""Configuration: every key declared once (type, default, comment); YAML and flags override.

Resolution order: declared defaults < ``cfgs/<task>.yml`` < ``cfgs/<task>_demo.yml`` (when
``--DATASET=demo``) < command line. A YAML file may hold top-level keys and two sections,
``search:`` and ``train:``, applied only to that kind of run. An unknown key or a value of
the wrong type is an error that names the key, where it came from and what was expected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CFG_DIR = REPO / "cfgs"


class ConfigError(ValueError):
    """A configuration value a user wrote is wrong; the message says which and why."""


@dataclass(frozen=True)
class Key:
    type: str      # 'int' | 'float' | 'str' | 'bool' | 'list[int]' | 'list[float]' | 'list[str]'
    default: Any
    doc: str
    optional: bool = False   # True: null (None) is a valid value


# Every configuration key, once. Grouped as a user reads them.
KEYS: dict[str, Key] = {
    # --- run -----------------------------------------------------------------------------
    "TASK": Key("str", "vqa", "task: vqa | vgd | itm (set by the script)"),
    "RUN_MODE": Key("str", "train", "train | val | test (flag --RUN)"),
    "DATASET": Key("str", "vqa", "dataset name; 'demo' selects the embedded synthetic data"),
    "VERSION": Key("str", "", "run name; the run folder is logs/<task>/<search|train>/<VERSION>; "
                   "empty: a timestamp"),
    "SEED": Key("int", None, "random seed; null: drawn at random and recorded in config.yaml",
                optional=True),
    "GPU": Key("str", "0", "GPU ids, e.g. '0'; runs on CPU when no GPU is present"),
    "NUM_WORKERS": Key("int", 2, "data-loader worker processes (flag --NW)"),
    "DATA_ROOT": Key("str", "datasets", "root of the data tree (see datasets/README.md)"),
    "DATA_LAYOUT": Key("str", "auto", "layout of DATA_ROOT: 'ours' (datasets/README.md), "
                       "'original' (the original MMNas's data/ tree, used as it is) or 'auto' "
                       "(detected from its folders; the log says which)"),
    "LOG_ROOT": Key("str", "logs", "root of the run folders"),
    "RESUME": Key("bool", False, "continue the run named by --VERSION (or --CKPT_PATH) exactly"),
    "CKPT_PATH": Key("str", "", "checkpoint to load: ours or the original's released format"),
    "ARCH_PATH": Key("str", "", "architecture JSON for training (see arch/)"),
    "ARCH_EPOCH": Key("int", 0, "which 'epochN' key of ARCH_PATH to train (alias --GENO_EPOCH)"),
    "TRAIN_SPLIT": Key("str", "train", "training splits joined by '+', e.g. train+val+vg "
                       "(flag --SPLIT)"),
    "EVAL_SPLIT": Key("str", "val", "split(s) evaluated after each epoch and by --RUN=val; "
                      "several with commas, e.g. val,testA,testB"),
    "TEST_SPLIT": Key("str", "test", "split(s) answered by --RUN=test, comma-separated"),
    "EVAL_EVERY_EPOCH": Key("bool", True, "evaluate EVAL_SPLIT after each epoch when it is not "
                            "in TRAIN_SPLIT"),
    "AMP": Key("str", "off", "mixed precision for search, training and evaluation: off | bf16 "
               "| fp16 (fp16 with loss scaling; bf16 also on CPUs with bf16 units)"),
    "SUBSET": Key("int", 0, "use only the first N samples of every split (0: all); for quick tries"),
    # --- data --------------------------------------------------------------------------------
    "WORD_VECTORS": Key("str", "spacy:en_vectors_web_lg",
                        "word-vector source: 'spacy:<model>' (en_vectors_web_lg or "
                        "en_core_web_lg), 'glove:<path to glove.840B.300d.txt>', or 'hash' "
                        "(deterministic per-word vectors, offline)"),
    "MAX_TOKEN": Key("int", 14, "text tokens per sample (longer texts are cut)"),
    "MAX_REGIONS": Key("int", 100, "image regions per sample (more are cut)"),
    "ANSWER_DICT": Key("str", "", "VQA answer vocabulary [ans_to_ix, ix_to_ans]; empty: built "
                       "from train+val annotations (answers occurring > ANS_MIN_COUNT-1 times)"),
    "ANS_MIN_COUNT": Key("int", 9, "VQA: keep answers occurring at least this often (> 8)"),
    "ITM_NEG_CANDIDATES": Key("int", 64, "ITM: random candidates scored per image and per "
                              "caption when mining hard negatives"),
    "ITM_HARD_NEG_EPOCH": Key("int", 0, "ITM: first (0-based) epoch with mined hard negatives; "
                              "earlier epochs draw random negatives (0: mine from the start, "
                              "as the original)"),
    "ITM_NEG_TOPK": Key("int", 5, "ITM: hardest candidates kept; each sample draws one"),
    "ITM_POS_TWICE": Key("bool", True, "ITM: count the positive pair's BCE twice, as the "
                         "original does"),
    # --- model -------------------------------------------------------------------------------
    "HSIZE": Key("int", 512, "hidden size H"),
    "WORD_EMBED_SIZE": Key("int", 300, "word-vector size"),
    "IMG_FEAT_SIZE": Key("int", 2048, "region feature size"),
    "REL_SIZE": Key("int", 64, "relation embedding size (Linear(4 -> REL_SIZE) + ReLU)"),
    "DROPOUT_R": Key("float", 0.1, "dropout rate"),
    "FLAT_MLP_SIZE": Key("int", 512, "AttFlat MLP hidden size"),
    "FLAT_GLIMPSES": Key("int", 1, "AttFlat glimpses"),
    "ENC_BLOCKS": Key("int", 12, "encoder blocks (text)"),
    "DEC_BLOCKS": Key("int", 18, "decoder blocks (image, guided by text)"),
    # --- optimisation ------------------------------------------------------------------------
    "BATCH_SIZE": Key("int", 64, "batch size (flag --BS)"),
    "EVAL_BATCH_SIZE": Key("int", 0, "evaluation batch size; 0: same as BATCH_SIZE"),
    "MAX_EPOCH": Key("int", 13, "epochs"),
    "LR_BASE": Key("float", 1.2e-4, "base learning rate"),
    "LR_WARMUP_EPOCHS": Key("int", 3, "warm-up epochs: lr x 1/(W+1), 2/(W+1), ..."),
    "LR_DECAY_EPOCHS": Key("list[int]", [10, 12], "0-based epochs at whose start lr is "
                           "multiplied by LR_DECAY_RATE (the original's LR_DECAY_LIST)"),
    "LR_DECAY_RATE": Key("float", 0.2, "learning-rate decay factor"),
    "OPT_BETAS": Key("list[float]", [0.9, 0.98], "Adam betas"),
    "OPT_EPS": Key("float", 1e-9, "Adam eps"),
    "GRAD_CLIP": Key("float", 1.0, "gradient-norm clip; 0: off"),
    # --- search ------------------------------------------------------------------------------
    "ENC_CANDIDATES": Key("list[str]", ["self_att_64", "feed_forward"], "search space, encoder"),
    "DEC_CANDIDATES": Key("list[str]", ["self_att_64", "rel_self_att_64", "guided_att_64",
                                        "feed_forward"], "search space, decoder"),
    "ENC_PRIOR": Key("list[str]", ["self_att_64", "feed_forward"],
                     "alpha prior, repeated over the encoder blocks (+1 its op, -1 others)"),
    "DEC_PRIOR": Key("list[str]", ["rel_self_att_64", "guided_att_64", "feed_forward"],
                     "alpha prior, repeated over the decoder blocks"),
    "ARCH_SPLIT_RATIO": Key("float", 0.8, "search: first part of the train split for weights, "
                            "the rest (fixed order) for the architecture"),
    "ARCH_EVAL_SAMPLES": Key("int", 0, "search: score the arg-max network on the first N samples "
                             "of the architecture split after each epoch (0: all of it)"),
    "ARCH_MODE": Key("str", "full", "architecture gradient: 'full' (all candidates) | 'two'"),
    "ARCH_LR": Key("float", 0.1, "architecture (alpha) learning rate"),
    "ARCH_BETAS": Key("list[float]", [0.0, 0.999], "architecture Adam betas"),
    "ARCH_START_EPOCH": Key("int", 20, "first 0-based epoch with architecture steps"),
    "ARCH_STEP_EVERY": Key("int", 5, "one architecture step every N weight steps"),
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
        return copy.deepcopy(self._values)

    def dump(self) -> str:
        return yaml.safe_dump(self._values, sort_keys=False, default_flow_style=None)

    def eval_batch_size(self) -> int:
        return self.EVAL_BATCH_SIZE or self.BATCH_SIZE


def check_value(name: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits the declared type of ``name`` (ints accepted as floats)."""
    if name not in KEYS:
        raise ConfigError(f"{source}: unknown config key {name!r}; "
                          f"close matches: {_close(name)}")
    key = KEYS[name]
    if value is None and key.optional:
        return None
    ok, fixed = _fits(key.type, value)
    if not ok:
        article = "an" if key.type[0] in "aeiou" else "a"
        raise ConfigError(f"{source}: {name} = {value!r} is not {article} {key.type}"
                          f"{' or null' if key.optional else ''} ({key.doc})")
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


def _close(name: str) -> str:
    import difflib
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
    return Config(values)
