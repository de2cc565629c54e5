"""Pack bottom-up-attention ``.npz`` feature folders into one memory-mapped store.

    python3 pack_features.py --src datasets/coco_extract/train2014 \\
        datasets/coco_extract/val2014 datasets/coco_extract/test2015 \\
        --out datasets/coco_extract/packed

Loading then reads a slice of a memory map instead of decompressing a file per sample; the
tasks pick the store up by themselves (``core.data.features.open_features``: it must be
``<parent of the folders>/packed``).  An interrupted run resumes when rerun with the same
arguments.  Layout and rules: ``core/data/packed.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.data.npz import FeatureError
from core.data.pack import pack, read_progress
from core.data.packed import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", nargs="+", required=True, type=Path, metavar="DIR",
                   help="folders of *_<image id>.jpg.npz feature files")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="store folder")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="feature precision on disk (float16 halves the size)")
    p.add_argument("--feat-size", type=int, default=2048, help="feature width (IMG_FEAT_SIZE)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a finished store")
    return p.parse_args(argv)


def summary(info: dict, out: Path) -> str:
    resumed = f", resumed at image {info['resumed_at']}" if info["resumed_at"] else ""
    return (f"packed {info['n_images']:,} images, {info['n_regions']:,} regions from "
            f"{len(info['sources'])} folder(s) into {out}: {info['bytes'] / 2**20:,.1f} MiB "
            f"({info['dtype']}) in {info['seconds']:.1f} s{resumed}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = pack(args.src, args.out, args.dtype, args.feat_size, args.overwrite)
    except (FeatureError, OSError) as e:
        hint = " (the images before it are saved; rerun to resume)" if \
            read_progress(args.out) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {read_progress(args.out):,} images; rerun the same command "
              f"to resume", file=sys.stderr)
        return 130
    print(summary(info, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
