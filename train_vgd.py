"""Train, evaluate (--RUN=val) or test (--RUN=test) a visual-grounding architecture."""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.train import run_train
from core.tasks.vgd import VGDTask

if __name__ == "__main__":
    main(VGDTask, "train", run_train)
