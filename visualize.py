"""Draw an architecture JSON, or the attention map of a trained model on one sample.

  python3 visualize.py arch arch/mmnas_vqa.json [--epoch 0] [--out mmnas_vqa.png]
  python3 visualize.py attention logs/vqa/train/<VERSION>/epoch8.pkl --sample <question_id>
      [--split val] [--data-root datasets/demo] [--out attention.png]

``--sample`` is a VQA question id, a VGD sent id or an ITM caption index in the split. The
image file is drawn when it is under <DATA_ROOT>/images/ (or one folder below), else a
blank canvas of the image's size.
"""
import argparse
import os
import sys
from pathlib import Path

from core.arch import ArchError, parse_arch, read_arch_file
from core.cli import fail
from core.config import ConfigError
from core.pictures import PictureError, draw_attention
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from core.tasks.vqa import VQATask
from utils import plots
from utils.checkpoint import CheckpointError


def arch_command(args) -> Path:
    path = Path(args.path)
    key, entry = _entry(path, args.epoch)
    out = Path(args.out or path.with_suffix(".png").name)
    drawn = plots.arch_diagram(out, entry, f"{path.name} [{key}]")
    print(f"{out}: {len(drawn['enc'])} encoder and {len(drawn['dec'])} decoder blocks, "
          f"{len(drawn['guided'])} decoder blocks read the encoder")
    return out


def _entry(path: Path, epoch: int | None) -> tuple[str, dict]:
    """("epochN", its entry, checked as training checks it) of an architecture file; the
    last entry when ``epoch`` is None. Any number of blocks is drawn."""
    data = read_arch_file(path)
    if not isinstance(data, dict) or not data:
        raise ArchError(f"{path}: expected an object of \"epochN\" entries")
    key = f"epoch{epoch}" if epoch is not None else list(data)[-1]
    if key not in data:
        raise ArchError(f"{path}: no key {key!r}; keys present: {', '.join(data)}")
    entry = data[key]
    sizes = [len(entry[s]) if isinstance(entry, dict) and isinstance(entry.get(s), list) else 0
             for s in ("enc", "dec")]
    parse_arch(entry, f"{path} [{key}]", *sizes)     # the same checks as training
    return key, entry


TASKS = {"vqa": VQATask, "vgd": VGDTask, "itm": ITMTask}


def attention_command(args) -> Path:
    out = Path(args.out or f"attention_{args.sample}.png")
    drawn = draw_attention(args.checkpoint, args.sample, out, TASKS, args.split, args.data_root)
    where = drawn["image_file"] or "a blank canvas (no image file under DATA_ROOT/images/)"
    print(f"{out}: drawn over {where}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arch", help="draw an architecture JSON (encoder and decoder stacks)")
    a.add_argument("path")
    a.add_argument("--epoch", type=int, help="the 'epochN' entry (default: the last one)")
    a.add_argument("--out", help="PNG to write (default: <name>.png here)")
    t = sub.add_parser("attention", help="attention map of a training checkpoint on a sample")
    t.add_argument("checkpoint")
    t.add_argument("--sample", required=True,
                   help="VQA question id, VGD sent id or ITM caption index")
    t.add_argument("--split", help="default: the checkpoint's first EVAL_SPLIT")
    t.add_argument("--data-root", help="default: the checkpoint's DATA_ROOT")
    t.add_argument("--out", help="PNG to write (default: attention_<sample>.png here)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        (arch_command if args.command == "arch" else attention_command)(args)
    except (ArchError, ConfigError, CheckpointError, PictureError, FileNotFoundError,
            ValueError) as e:
        if os.environ.get("MMNAS_TRACEBACK"):
            raise
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
