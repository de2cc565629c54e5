"""A search study: does the search find better architectures than a coin would?

With one training schedule and the same seeds, a study trains: the architecture a search
run inside the study finds (from the original's prior, and from uniform alphas) or one
given with ``--ARCH_PATH``; the paper's (``arch/mmnas_<task>.json``) and MCAN's; N
architectures drawn uniformly over the candidates with the same block counts; and random
search, the best of those N on the search's architecture split (never on val), next to
what it cost. The sanity check of Li & Talwalkar (2019) and Yang et al. (2020).

Every search and training is a normal run (``core/run.py`` start, ``run_search``,
``run_train``) in ``<study folder>/runs/``; a study that is interrupted and started again
with the same ``--VERSION`` reuses the runs that finished and resumes the one that did not.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import config as config_mod
from core.arch import Arch, load_arch
from core.cli import parse_args
from core.run import start
from core.model import prior_arch
from core.search import run_search, split_for_search
from core.train import run_train
from utils import plots
from utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# The search's two parts of the train split, as split names a training run can ask for:
# random search trains on the first and ranks on the second, as the search does.
WEIGHT_PART, ARCH_PART = "searchweights", "searcharch"
RESULT = "study_result.json"        # what a finished run of the study left (reused on restart)


@dataclass
class Plan:
    """What one study runs. ``flags`` go to every run; ``search_flags`` / ``train_flags``
    (after them) to the searches / trainings only."""
    task_cls: type
    folder: Path
    seeds: list[int]
    n_random: int = 8
    flags: list[str] = field(default_factory=list)
    search_flags: list[str] = field(default_factory=list)
    train_flags: list[str] = field(default_factory=list)
    arch_path: str = ""             # given: train it instead of searching
    arch_epoch: int = 0

    @property
    def runs(self) -> Path:
        return self.folder / "runs"


def studied(task_cls):
    """``task_cls`` that also serves the search's two parts of train as splits, and records
    its last evaluation's cost (ms per sample) and the network's parameter count."""
    class Studied(task_cls):
        last_eval: dict = {}

        def dataset(self, split):
            if split not in (WEIGHT_PART, ARCH_PART):
                return super().dataset(split)
            parts = split_for_search(super().dataset("train"), self.cfg.ARCH_SPLIT_RATIO)
            return parts[0] if split == WEIGHT_PART else parts[1]

        def evaluate(self, net, dataset, device, desc):
            t = time.perf_counter()
            out = super().evaluate(net, dataset, device, desc)
            self.last_eval = {"ms_per_sample": 1000 * (time.perf_counter() - t) / len(dataset),
                              "params": sum(p.numel() for p in net.parameters())}
            return out

    Studied.__name__ = Studied.__qualname__ = f"Studied{task_cls.__name__}"
    return Studied


# --------------------------------------------------------------------------- single runs

def _finished(folder: Path) -> dict | None:
    path = folder / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def _argv(plan: Plan, kind: str, version: str, seed: int, extra: list[str]) -> list[str]:
    own = plan.search_flags if kind == "search" else plan.train_flags
    argv = [*plan.flags, *own, f"--SEED={seed}", f"--VERSION={version}",
            f"--LOG_ROOT={plan.runs}", *extra]
    if (plan.runs / plan.task_cls.name / ("search" if kind == "search" else "train")
            / version / "config.yaml").is_file():
        argv.append("--RESUME")         # an interrupted study: continue the run it left
    return argv


def search_once(plan: Plan, version: str, extra: list[str]) -> dict:
    """One search; its arg-max architecture of the last epoch and its cost in CPU seconds."""
    folder = plan.runs / plan.task_cls.name / "search" / version
    done = _finished(folder)
    if done:
        return done
    cfg, run, task = start(studied(plan.task_cls), "search",
                           _argv(plan, "search", version, plan.seeds[0], extra))
    t = time.process_time()
    metrics = run_search(cfg, task, run)
    result = {"arch_path": str(run.folder / "arch.json"), "arch_epoch": cfg.MAX_EPOCH,
              "cpu_s": time.process_time() - t, "arch_split": metrics,
              "score_arch_split": metrics.get(task.headline)}
    atomic_write_json(run.folder / RESULT, result)
    return result


def train_once(plan: Plan, version: str, arch_path: str, arch_epoch: int, seed: int,
               extra: tuple[str, ...] = ()) -> dict:
    """One training of an architecture; its headline metric on the evaluated split."""
    folder = plan.runs / plan.task_cls.name / "train" / version
    done = _finished(folder)
    if done:
        return done
    cfg, run, task = start(studied(plan.task_cls), "train", _argv(
        plan, "train", version, seed,
        [f"--ARCH_PATH={arch_path}", f"--ARCH_EPOCH={arch_epoch}", *extra]))
    t = time.process_time()
    metrics = run_train(cfg, task, run)
    if task.headline not in metrics:
        raise ValueError(f"{run.folder}: the training evaluated no split with labels; the "
                         f"study needs EVAL_SPLIT={cfg.EVAL_SPLIT!r} scored after each epoch")
    result = {"seed": seed, "score": metrics[task.headline], "metrics": metrics,
              "cpu_s": time.process_time() - t, **task.last_eval}
    atomic_write_json(run.folder / RESULT, result)
    return result


# --------------------------------------------------------------------------- the arms

def resolved(plan: Plan, kind: str, extra: tuple[str, ...] = ()):
    """The config every run of ``kind`` gets (block counts, candidates, splits)."""
    own = plan.search_flags if kind == "search" else plan.train_flags
    overrides = parse_args([*plan.flags, *own, *extra], plan.task_cls.datasets)
    return config_mod.resolve(plan.task_cls.name, kind, overrides)


def random_archs(cfg, n: int, seed: int) -> list[Arch]:
    """``n`` architectures, every block drawn uniformly over its side's candidates."""
    rng = random.Random(seed)
    return [Arch(tuple(rng.choice(cfg.ENC_CANDIDATES) for _ in range(cfg.ENC_BLOCKS)),
                 tuple(rng.choice(cfg.DEC_CANDIDATES) for _ in range(cfg.DEC_BLOCKS)))
            for _ in range(n)]


def train_arm(plan: Plan, name: str, kind: str, arch_path: str, arch_epoch: int,
              **extra) -> dict:
    """An arm: one architecture trained with every seed of the plan, summarised."""
    runs = [train_once(plan, f"{name}-seed{s}", arch_path, arch_epoch, s) for s in plan.seeds]
    arch = load_arch(arch_path, arch_epoch, *_blocks(plan))
    return {"name": name, "kind": kind, "arch": arch.to_json(),
            **summary([r["score"] for r in runs]), "runs": runs,
            "params": runs[0].get("params"),
            "ms_per_sample": statistics.mean(r.get("ms_per_sample", 0.0) for r in runs),
            **extra}


def _blocks(plan: Plan) -> tuple[int, int]:
    cfg = resolved(plan, "train")
    return cfg.ENC_BLOCKS, cfg.DEC_BLOCKS


def summary(scores: list[float]) -> dict:
    return {"scores": scores, "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0}


def searched_arms(plan: Plan) -> list[dict]:
    """The given architecture, or a search from the prior and one from uniform alphas."""
    if plan.arch_path:
        return [train_arm(plan, "given", "given", plan.arch_path, plan.arch_epoch)]
    arms = []
    for name, extra in (("search-prior", []),
                        ("search-uniform", ["--ENC_PRIOR=[]", "--DEC_PRIOR=[]"])):
        found = search_once(plan, name, extra)
        prior = prior_arch(resolved(plan, "search", tuple(extra)))
        arch = load_arch(found["arch_path"], found["arch_epoch"], *_blocks(plan))
        arms.append(train_arm(plan, name, "search", found["arch_path"], found["arch_epoch"],
                              cost_cpu_s=found["cpu_s"],
                              score_arch_split=found["score_arch_split"],
                              off_prior=None if prior is None else blocks_off(prior, arch)))
    return arms


def blocks_off(prior: Arch, arch: Arch) -> int:
    """Blocks where ``arch`` chose another operator than ``prior``: how far the search
    moved from where it started."""
    return (sum(a != b for a, b in zip(prior.enc, arch.enc))
            + sum(a != b for a, b in zip(prior.dec, arch.dec)))


def random_arms(plan: Plan) -> tuple[list[dict], dict]:
    """The N random architectures (each with every seed), and random search: the one of
    them that scores best on the architecture split after training on the weight split."""
    cfg = resolved(plan, "search")
    archs = random_archs(cfg, plan.n_random, plan.seeds[0])
    path = plan.folder / "random_archs.json"
    atomic_write_text(path, json.dumps({f"epoch{k + 1}": a.to_json()
                                        for k, a in enumerate(archs)}, indent=1) + "\n")
    split = [f"--SPLIT={WEIGHT_PART}", f"--EVAL_SPLIT={ARCH_PART}",
             f"--ARCH_SPLIT_RATIO={cfg.ARCH_SPLIT_RATIO}"]
    picks = [train_once(plan, f"random{k + 1}-select", str(path), k + 1, plan.seeds[0], split)
             for k in range(len(archs))]
    arms = [train_arm(plan, f"random{k + 1}", "random", str(path), k + 1,
                      score_arch_split=p["score"]) for k, p in enumerate(picks)]
    best = max(range(len(arms)), key=lambda k: picks[k]["score"])
    search = {**arms[best], "name": f"random search ({arms[best]['name']})",
              "kind": "random search", "cost_cpu_s": sum(p["cpu_s"] for p in picks)}
    return arms, search


def run_study(plan: Plan, log=print) -> dict:
    """Every arm, then the table (printed and ``table.md``), ``study.json`` and
    ``study.png`` in the study folder; returns what ``study.json`` holds."""
    task = plan.task_cls.name
    arms = searched_arms(plan)
    arms += [train_arm(plan, "paper", "paper", str(REPO / "arch" / f"mmnas_{task}.json"), 0),
             train_arm(plan, "mcan", "mcan", str(REPO / "arch" / "mcan.json"), 0)]
    randoms, random_search = random_arms(plan) if plan.n_random else ([], None)
    if random_search:
        arms.append(random_search)
    means = [a["mean"] for a in randoms]
    random_mean = ({"name": f"random (mean of {len(randoms)})", "kind": "random mean",
                    **summary(means),
                    "params": statistics.mean(a["params"] for a in randoms),
                    "ms_per_sample": statistics.mean(a["ms_per_sample"] for a in randoms)}
                   if randoms else None)
    result = {"task": task, "metric": plan.task_cls.headline, "seeds": plan.seeds,
              "flags": plan.flags, "search_flags": plan.search_flags,
              "train_flags": plan.train_flags, "arms": arms, "random": randoms,
              "random_mean": random_mean, "verdict": verdicts(arms, random_mean),
              "separation": separation(arms, randoms)}
    table = format_table(result)
    log(table)
    atomic_write_text(plan.folder / "table.md", table + "\n")
    atomic_write_json(plan.folder / "study.json", result)
    draw(plan.folder / "study.png", result)
    log(f"study: {plan.folder / 'study.json'}, {plan.folder / 'study.png'}")
    return result


def verdicts(arms: list[dict], random_mean: dict | None) -> dict:
    """For each searched (or given) arm: how many standard deviations of the random
    architectures it lies above their mean (> 2: it beats random), and whether it is within
    noise of the paper's architecture or better (mean >= paper's mean - both stds)."""
    paper = next(a for a in arms if a["kind"] == "paper")
    out = {}
    for arm in arms:
        if arm["kind"] not in ("search", "given"):
            continue
        v = {"vs_paper": arm["mean"] - paper["mean"],
             "paper_or_better": arm["mean"] >= paper["mean"] - arm["std"] - paper["std"]}
        if random_mean:
            spread = random_mean["std"]
            v["z_vs_random"] = ((arm["mean"] - random_mean["mean"]) / spread if spread > 0
                                else None)
            v["beats_random"] = v["z_vs_random"] is not None and v["z_vs_random"] > 2
        out[arm["name"]] = v
    return out


def separation(arms: list[dict], randoms: list[dict]) -> dict:
    """Does the data make the architecture matter at all? The gap between the best and the
    worst architecture (every arm and every random one, each a mean over the seeds) against
    the pooled seed standard deviation; a gap of more than twice it separates them. Where
    it does not, no arm can beat another on this data, the search included."""
    rows = [a for a in arms if a["kind"] != "random search"] + list(randoms)
    best = max(rows, key=lambda a: a["mean"])
    worst = min(rows, key=lambda a: a["mean"])
    seed_std = statistics.mean(a["std"] ** 2 for a in rows) ** 0.5
    gap = best["mean"] - worst["mean"]
    return {"best": best["name"], "worst": worst["name"], "gap": gap, "seed_std": seed_std,
            "separates": gap > 2 * seed_std}


def operator_counts(arch: dict) -> str:
    """What an architecture is made of, e.g. 'encoder 6 SA 6 FFN; decoder 7 RSA 4 SA ...'
    (most used first)."""
    def side(blocks):
        names = [plots.short(b[0]) for b in blocks]
        return " ".join(f"{names.count(n)} {n}"
                        for n in sorted(set(names), key=lambda n: (-names.count(n), n)))
    return f"encoder {side(arch['enc'])}; decoder {side(arch['dec'])}"


def format_table(result: dict) -> str:
    """Markdown: one row per arm (and per random architecture), the verdicts below."""
    metric, n = result["metric"], len(result["seeds"])
    lines = [f"| {result['task']} arm | {metric} mean ± std ({n} seeds) | parameters | "
             f"eval ms/sample | CPU s to find it | on the arch split |",
             "|---|---|---|---|---|---|"]
    rows = list(result["arms"])
    if result["random_mean"]:
        rows += [result["random_mean"], *result["random"]]
    for a in rows:
        cost = f"{a['cost_cpu_s']:.0f}" if a.get("cost_cpu_s") is not None else ""
        arch_split = (f"{a['score_arch_split']:.2f}" if a.get("score_arch_split") is not None
                      else "")
        params = f"{a['params'] / 1e6:.3f} M" if a.get("params") else ""
        lines.append(f"| {a['name']} | {a['mean']:.2f} ± {a['std']:.2f} | {params} | "
                     f"{a.get('ms_per_sample', 0.0):.2f} | {cost} | {arch_split} |")
    sep = result.get("separation")
    if sep:
        ratio = f"{sep['gap'] / sep['seed_std']:.1f}x" if sep["seed_std"] > 0 else "n/a"
        lines.append(f"\nbest ({sep['best']}) - worst ({sep['worst']}) = {sep['gap']:.2f}, "
                     f"{ratio} the pooled seed std {sep['seed_std']:.2f}: the architecture "
                     + ("matters on this data (more than 2x)" if sep["separates"] else
                        "does not clearly matter on this data (2x or less)"))
    for arm in result["arms"]:
        if arm["kind"] in ("search", "given", "paper", "mcan"):
            moved = ("" if arm.get("off_prior") is None else
                     f" ({arm['off_prior']} of {len(arm['arch']['enc']) + len(arm['arch']['dec'])}"
                     f" blocks off the prior it started from)")
            lines.append(f"\n{arm['name']}: {operator_counts(arm['arch'])}{moved}")
    for name, v in result["verdict"].items():
        z = v.get("z_vs_random")
        lines.append(f"\n{name}: {v['vs_paper']:+.2f} vs the paper's architecture "
                     f"({'within noise or better' if v['paper_or_better'] else 'worse'})"
                     + ("" if "z_vs_random" not in v else
                        f"; {'n/a' if z is None else f'{z:+.1f}'} std of the random "
                        f"architectures from their mean "
                        f"({'beats random' if v['beats_random'] else 'does not beat random'})"))
    return "\n".join(lines)


def draw(path: Path, result: dict) -> dict:
    rows = [(a["name"], a["scores"]) for a in result["arms"]]
    if result["random_mean"]:
        rows.append((result["random_mean"]["name"], result["random_mean"]["scores"]))
    return plots.study_chart(path, rows, result["metric"],
                             f"{result['task']}: {len(result['seeds'])} seeds per arm")
