"""Train, evaluate (--RUN=val) or answer the test split (--RUN=test) with a VQA architecture."""
import demo  # noqa: F401  (registers the --DATASET=demo builders)
from core.run import main
from core.train import run_train
from core.tasks.vqa import VQATask

if __name__ == "__main__":
    main(VQATask, "train", run_train)
