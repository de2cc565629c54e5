#!/usr/bin/env python3
"""RefCOCO / RefCOCO+ / RefCOCOg: the refer toolkit's raw files -> <out>/<split>.json.

    python3 preprocess_vgd.py --dataset refcocog --raw /path/to/refcocog \
        [--out datasets/vgd/refcocog]

The raw folder holds refs(unc).p (refcoco, refcoco+) or refs(umd).p (refcocog) and
instances.json. See core/tasks/vgd/refer.py.
"""
import sys

from core.tasks.vgd.refer import main

if __name__ == "__main__":
    sys.exit(main())
