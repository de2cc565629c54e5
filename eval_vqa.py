#!/usr/bin/env python3
"""Official VQA-v2 accuracy of a result file (see core/tasks/vqa/evaluation.py).

    python3 eval_vqa.py --result R.json --questions Q.json \
        --annotations A.json [--subset] [--out metrics.json]
"""
import sys

from core.tasks.vqa.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
