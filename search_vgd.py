"""Search an MMNas architecture for visual grounding: python3 search_vgd.py --DATASET=demo"""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.search import run_search
from core.tasks.vgd import VGDTask

if __name__ == "__main__":
    main(VGDTask, "search", run_search)
