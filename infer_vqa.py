"""Answer one question about one image with a trained VQA model: the top answers and scores.

  python3 infer_vqa.py --CKPT_PATH=logs/vqa/train/t1/epoch13.pkl \
      --FEATURES=datasets/coco_extract/val2014/COCO_val2014_000000000042.jpg.npz \
      --QUESTION="what color is the bus?"

Our checkpoints carry their architecture, vocabulary and answers. The original's released
files need --ARCH_PATH (e.g. arch/mmnas_vqa.json) and the question files under --DATA_ROOT
(the vocabulary is rebuilt from them). No word vectors are read.
"""
import argparse
import os
import sys

from core.arch import ArchError
from core.cli import fail
from core.config import ConfigError
from core.data.npz import FeatureError
from core.tasks.vqa.infer import load_model, top_answers
from utils.checkpoint import CheckpointError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--CKPT_PATH", required=True, help="a train_vqa.py checkpoint (or released)")
    p.add_argument("--FEATURES", required=True, help="the image's bottom-up feature .npz")
    p.add_argument("--QUESTION", required=True, help="the question, in English")
    p.add_argument("--ARCH_PATH", default="", help="architecture JSON (released checkpoints)")
    p.add_argument("--ARCH_EPOCH", type=int, default=0, help="its 'epochN' entry")
    p.add_argument("--DATA_ROOT", help="data tree with the question files (released "
                                       "checkpoints; default: the checkpoint's)")
    p.add_argument("--TOP", type=int, default=5, help="how many answers (default 5)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.TOP < 1:
        fail(f"--TOP={args.TOP}: expected a number of answers >= 1")
    try:
        net, task = load_model(args.CKPT_PATH, args.ARCH_PATH, args.ARCH_EPOCH, args.DATA_ROOT,
                               log=lambda m: print(m, file=sys.stderr))
        answers, unknown = top_answers(net, task, args.FEATURES, args.QUESTION, args.TOP)
    except (ArchError, ConfigError, CheckpointError, FeatureError, FileNotFoundError,
            ValueError) as e:
        if os.environ.get("MMNAS_TRACEBACK"):
            raise
        fail(str(e))
    print(f"question: {args.QUESTION}")
    if unknown:
        print(f"not in the vocabulary (read as UNK): {', '.join(unknown)}")
    print(f"top {len(answers)} answers (sigmoid score):")
    for rank, (answer, score) in enumerate(answers, 1):
        print(f"  {rank}. {answer:<20} {score:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
