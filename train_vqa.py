"""Train, evaluate (--RUN=val) or answer the test split (--RUN=test) with a VQA architecture."""
from core.engine import start
from core.train import run_train
from core.tasks.vqa import VQATask

if __name__ == "__main__":
    cfg, run, task = start(VQATask, "train")
    run_train(cfg, task, run)
