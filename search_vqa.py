"""Search an MMNas architecture for VQA: python3 search_vqa.py --DATASET=demo (see README)."""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.search import run_search
from core.tasks.vqa import VQATask

if __name__ == "__main__":
    main(VQATask, "search", run_search)
