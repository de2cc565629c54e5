"""Search an MMNas architecture for image-text matching: python3 search_itm.py --DATASET=demo"""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.search import run_search
from core.tasks.itm import ITMTask

if __name__ == "__main__":
    main(ITMTask, "search", run_search)
