#!/usr/bin/env python3
"""Official VQA-v2 accuracy of a result file (see utils/vqa_eval.py).

    python3 eval_vqa.py --result R.json --questions Q.json \
        --annotations A.json [--subset] [--out metrics.json]
"""
import sys

from utils.vqa_eval import main

if __name__ == "__main__":
    sys.exit(main())
