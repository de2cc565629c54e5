"""Where a task's files live under DATA_ROOT: our tree, or the original MMNas's ``data/`` tree.

Users coming from the original point ``--DATA_ROOT`` at its ``data/`` folder and nothing
moves. The two trees differ only in these folders (the rest is the same in both):

    task  our tree (datasets/README.md)      the original's (MILVLG/mmnas docs/dataset_setup.md)
    vqa   vqa/<questions, annotations>       vqa/annotations/<the same files>
          coco_extract/{train2014,...}/      vqa/bua-r101-max100/{train2014,val2014,test2015}/
    vgd   vgd/feats/                         vgd/bua-r101-fix100/
    itm   itm/feats/                         itm/flickr_bua-r101-fix36/

``DATA_LAYOUT=auto`` looks for those folders; ``ours`` / ``original`` skip the look.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError

NAMES = {"ours": "ours", "original": "the original MMNas's"}

# task -> (folder of the text files, folder of the features), relative to DATA_ROOT.
# VQA features: the folder holding train2014/ val2014/ test2015/; VGD, ITM: the .npz folder.
TREES = {
    "ours": {"vqa": ("vqa", "coco_extract"), "vgd": ("vgd", "vgd/feats"),
             "itm": ("itm", "itm/feats")},
    "original": {"vqa": ("vqa/annotations", "vqa/bua-r101-max100"),
                 "vgd": ("vgd", "vgd/bua-r101-fix100"),
                 "itm": ("itm", "itm/flickr_bua-r101-fix36")},
}
# What only one layout has: glob patterns under DATA_ROOT.
MARKERS = {
    "ours": {"vqa": ("coco_extract", "vqa/*_questions.json"), "vgd": ("vgd/feats",),
             "itm": ("itm/feats",)},
    "original": {"vqa": ("vqa/bua-r101-max100", "vqa/annotations"),
                 "vgd": ("vgd/bua-r101-fix100",), "itm": ("itm/flickr_bua-r101-fix36",)},
}


@dataclass(frozen=True)
class DataPaths:
    layout: str         # 'ours' | 'original'
    text: Path          # VQA question/annotation files; VGD: holds <dataset>/; ITM: f30k_precomp/
    features: Path      # VQA: holds train2014/ val2014/ test2015/; VGD, ITM: the .npz files
    why: str            # how the layout was chosen, for the log

    def describe(self) -> str:
        return (f"data layout: {NAMES[self.layout]} ({self.why}); text files in {self.text}, "
                f"features in {self.features} (see dataset_setup.md)")


def data_paths(task: str, root: Path, setting: str, dataset: str) -> DataPaths:
    """The layout ``setting`` asks for, or (``auto``) the one found under ``root``."""
    root = Path(root)
    if dataset == "demo":
        if setting == "original":
            raise ConfigError("DATA_LAYOUT=original does not apply to --DATASET=demo (the "
                              "demo data are built in our layout); drop the flag")
        return _paths("ours", task, root, "the demo is built in it")
    if setting != "auto":
        return _paths(setting, task, root, f"DATA_LAYOUT={setting}")
    found = {name: [p for p in MARKERS[name][task] if any(root.glob(p))] for name in TREES}
    if found["ours"] and found["original"]:
        raise ConfigError(
            f"{root} holds both data layouts for {task}: ours ({', '.join(found['ours'])}) "
            f"and the original's ({', '.join(found['original'])}); set --DATA_LAYOUT=ours or "
            f"--DATA_LAYOUT=original")
    if found["original"]:
        return _paths("original", task, root, f"found {', '.join(found['original'])} in {root}")
    if found["ours"]:
        return _paths("ours", task, root, f"found {', '.join(found['ours'])} in {root}")
    return _paths("ours", task, root, f"no {task} folder of either layout in {root}")


def _paths(layout: str, task: str, root: Path, why: str) -> DataPaths:
    text, features = TREES[layout][task]
    return DataPaths(layout, root / text, root / features, why)
