"""Train, evaluate (--RUN=val) or test (--RUN=test) an image-text matching architecture."""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.train import run_train
from core.tasks.itm import ITMTask

if __name__ == "__main__":
    main(ITMTask, "train", run_train)
