"""The original MMNas's ``data/`` tree works as it is: ``--DATA_ROOT`` points at it, nothing moves.

The tree is built the way the original's docs/dataset_setup.md lays it out, from the real
samples in tests/data under the original's file names; the grounding splits are written the
way the original's tools/ref_process_g.py writes them (no ``sent_id``), and the feature files
in the bottom-up-attention format (``x`` [2048, K], ``bbox``, ``image_h``, ``image_w``,
``num_bbox``).
"""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_VQA, VAL_ANNOTATIONS, VAL_IMAGE_IDS, VAL_QUESTIONS, write_npz
from core.config import ConfigError, resolve
from core.data.npz import FeatureError
from core.run import start
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from core.tasks.vqa import VQATask
from core.train import run_train

DATA = Path(__file__).resolve().parent / "data"
ORIGINAL = "data layout: the original MMNas's"
# tiny networks of the shipped architectures (H = 64 like the demo configs), one epoch
TINY = ["--WORD_VECTORS=hash", "--HSIZE=64", "--FLAT_MLP_SIZE=64", "--REL_SIZE=16",
        "--BS=4", "--NW=0", "--SEED=1", "--MAX_EPOCH=1", "--LR_WARMUP_EPOCHS=1", "--PICTURES=false"]
VQA_SPLIT_DIRS = {"train": "train2014", "val": "val2014", "test": "test2015"}
ITM_IMAGES = 6          # the first dev images get features (36 boxes each)


# --------------------------------------------------------------------------- the tree


def build_vqa(data: Path) -> None:
    """data/vqa/annotations/ (the real val sample also under the train, test and VG names)
    and data/vqa/bua-r101-max100/{train2014,val2014,test2015}/COCO_<split>_<id>.jpg.npz."""
    ann = data / "vqa" / "annotations"
    ann.mkdir(parents=True)
    for split in ("train2014", "val2014"):
        shutil.copyfile(REAL_VQA / VAL_QUESTIONS, ann / f"v2_OpenEnded_mscoco_{split}_questions.json")
        shutil.copyfile(REAL_VQA / VAL_ANNOTATIONS, ann / f"v2_mscoco_{split}_annotations.json")
    for name in ("test2015", "test-dev2015"):
        shutil.copyfile(REAL_VQA / VAL_QUESTIONS, ann / f"v2_OpenEnded_mscoco_{name}_questions.json")
    shutil.copyfile(REAL_VQA / VAL_QUESTIONS, ann / "VG_questions.json")
    shutil.copyfile(REAL_VQA / VAL_ANNOTATIONS, ann / "VG_annotations.json")
    for j, folder in enumerate(VQA_SPLIT_DIRS.values()):
        for n, iid in enumerate(VAL_IMAGE_IDS):
            write_npz(data / "vqa" / "bua-r101-max100" / folder /
                      f"COCO_{folder}_{iid:012d}.jpg.npz", 10 + n % 6, seed=[iid, j])


def ref_process_g(refs_file: Path, instances_file: Path, out: Path) -> None:
    """What the original's tools/ref_process_g.py writes: per sentence tokens, the ref's own
    file_name, image_id, split, the annotation's bbox, category name, image height/width."""
    with open(refs_file, "rb") as f:
        refs = pickle.load(f)
    inst = json.loads(instances_file.read_text())
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    cats = {c["id"]: c for c in inst["categories"]}
    splits = {"train": [], "val": [], "test": []}
    for ref in refs:
        for sent in ref["sentences"]:
            splits[ref["split"]].append({
                "tokens": sent["tokens"], "file_name": ref["file_name"],
                "image_id": ref["image_id"], "split": ref["split"],
                "bbox": anns[ref["ann_id"]]["bbox"], "name": cats[ref["category_id"]]["name"],
                "height": images[ref["image_id"]]["height"],
                "width": images[ref["image_id"]]["width"]})
    out.mkdir(parents=True)
    for split, samples in splits.items():
        (out / f"{split}.json").write_text(json.dumps(samples))


def vgd_feature_file(data: Path, iid: int, n: int) -> Path:
    """Both names the original found: COCO's and the bare image id."""
    name = f"COCO_train2014_{iid:012d}.jpg.npz" if n % 2 else f"{iid}.npz"
    return data / "vgd" / "bua-r101-fix100" / name


def build_vgd(data: Path) -> list[int]:
    """data/vgd/refcocog/{train,val,test}.json + data/vgd/bua-r101-fix100/ (100 boxes)."""
    ref_process_g(DATA / "refcocog" / "refs(umd).p", DATA / "refcocog" / "instances.json",
                  data / "vgd" / "refcocog")
    ids = sorted({e["image_id"] for s in ("train", "val", "test") for e in
                  json.loads((data / "vgd" / "refcocog" / f"{s}.json").read_text())})
    for n, iid in enumerate(ids):
        write_npz(vgd_feature_file(data, iid, n), 100, seed=n)
    return ids


def build_itm(data: Path) -> list[str]:
    """data/itm/f30k_precomp/ (the real dev and test files; dev also as train),
    data/itm/dataset_flickr30k.json (Karpathy's format), data/itm/flickr_bua-r101-fix36/."""
    itm = data / "itm"
    (itm / "f30k_precomp").mkdir(parents=True)
    precomp = DATA / "flickr30k" / "f30k_precomp"
    for split, source in (("train", "dev"), ("dev", "dev"), ("test", "test")):
        for kind in ("caps", "ids"):
            shutil.copyfile(precomp / f"{source}_{kind}.txt", itm / "f30k_precomp" / f"{split}_{kind}.txt")
    mapping = json.loads((DATA / "flickr30k" / "id_mapping.json").read_text())
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": name, "imgid": int(imgid), "sentences": []} for imgid, name in mapping.items()]}
    (itm / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    dev_ids = (precomp / "dev_ids.txt").read_text().split()[::5][:ITM_IMAGES]
    names = [mapping[i] for i in dev_ids]
    for n, name in enumerate(names):     # '<id>.jpg.npz', and '<id>.npz' the original found too
        stem = name if n % 2 else name[:-len(".jpg")]
        write_npz(itm / "flickr_bua-r101-fix36" / f"{stem}.npz", 36, seed=n)
    return names


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("original")
    data = base / "data"
    build_vqa(data)
    vgd_ids = build_vgd(data)
    itm_names = build_itm(data)
    return base, data, vgd_ids, itm_names


def task_on(task_cls, data: Path, **over):
    values = {"DATA_ROOT": str(data), "WORD_VECTORS": "hash", **over}
    lines = []
    task = task_cls(resolve(task_cls.name, "train", values), log=lines.append)
    task.lines = lines
    return task


def moved_away(path: Path):
    """Context: ``path`` renamed for the block, put back after."""
    class Moved:
        def __enter__(self):
            path.rename(path.with_suffix(".gone"))

        def __exit__(self, *exc):
            path.with_suffix(".gone").rename(path)
    return Moved()


# --------------------------------------------------------------------------- datasets + batch


def test_vqa_reads_the_original_tree(tree):
    _, data, _, _ = tree
    task = task_on(VQATask, data, ANSWER_DICT="core/data/vqa_answer_dict.json")
    task.prepare()
    log = "\n".join(task.lines)
    assert f"{ORIGINAL}" in log and "found vqa/bua-r101-max100, vqa/annotations" in log
    assert f"text files in {data / 'vqa' / 'annotations'}" in log
    assert not any("note: vocabulary built from" in line for line in task.lines)  # all 4 files
    assert len(task.dataset("train+vg")) == 200
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        ds = task.dataset(split)
        batch = task.collate([ds[0], ds[1], ds[99]])
        for row, i in enumerate((0, 1, 99)):
            iid = ds.entries[i]["image_id"]
            with np.load(data / "vqa" / "bua-r101-max100" / folder /
                         f"COCO_{folder}_{iid:012d}.jpg.npz") as f:
                k = f["x"].shape[1]
                assert np.array_equal(batch["img"][row, :k].numpy(), f["x"].T)
                assert np.array_equal(batch["boxes"][row, :k].numpy(), f["bbox"])
        assert batch["img"].shape[2] == 2048 and batch["target"].shape == (3, 3129)
        assert batch["target"].sum() > 0
    assert (data / "vqa" / "cache").is_dir()     # caches go next to annotations/, not in it
    assert not (data / "vqa" / "annotations" / "cache").exists()


def test_vgd_reads_ref_process_splits_and_both_feature_names(tree):
    _, data, ids, _ = tree
    task = task_on(VGDTask, data, DATASET="refcocog")
    task.prepare()
    assert any(line.startswith(ORIGINAL) and "found vgd/bua-r101-fix100" in line
               for line in task.lines)
    ds = task.dataset("train+val+test")
    assert len(ds) == 28 and {e["image_id"] for e in ds.entries} == set(ids)
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert batch["img"].shape == (28, 100, 2048) and batch["boxes"].shape == (28, 100, 4)
    # no sent_id in the original's splits: predictions are traced by the sample's position
    assert batch["sent_id"] == list(range(28))
    e = ds.entries[0]
    n = ids.index(e["image_id"])
    with np.load(vgd_feature_file(data, e["image_id"], n)) as f:
        assert np.array_equal(batch["img"][0].numpy(), f["x"].T)
    x, y, w, h = e["bbox"]
    assert batch["gt"][0].tolist() == pytest.approx([x, y, x + w - 1, y + h - 1])


def test_itm_reads_the_original_tree(tree):
    _, data, _, names = tree
    task = task_on(ITMTask, data, DATASET="flickr", SUBSET=ITM_IMAGES, MAX_REGIONS=36)
    task.prepare()
    assert any(line.startswith(ORIGINAL) and "found itm/flickr_bua-r101-fix36" in line
               for line in task.lines)
    ds = task.dataset("dev")
    assert ds.n_images == ITM_IMAGES and len(ds) == 5 * ITM_IMAGES
    assert ds.keys == [int(n.split(".")[0]) for n in names]
    batch = task.collate([ds[0], ds[5 * ITM_IMAGES - 1]])
    assert batch["img"].shape == (2, 36, 2048)
    with np.load(data / "itm" / "flickr_bua-r101-fix36" / f"{names[1]}.npz") as f:
        assert np.array_equal(ds.image(1)[0], f["x"].T)


# --------------------------------------------------------------------------- one train step


@pytest.mark.parametrize("task_cls, args", [
    (VQATask, ["--SUBSET=8", "--ARCH_PATH=arch/mmnas_vqa.json"]),
    (VGDTask, ["--DATASET=refcocog", "--SUBSET=4", "--ARCH_PATH=arch/mmnas_vgd.json"]),
    (ITMTask, ["--SUBSET=2", "--ARCH_PATH=arch/mmnas_itm.json", "--ITM_NEG_CANDIDATES=4", "--ITM_NEG_TOPK=2",
               "--MAX_TOKEN=16"])])
def test_train_script_runs_on_the_original_tree(tree, task_cls, args):
    base, data, _, _ = tree
    cfg, run, task = start(task_cls, "train", TINY + args + [
        f"--DATA_ROOT={data}", f"--LOG_ROOT={base / 'logs'}", f"--VERSION={task_cls.name}"])
    metrics = run_train(cfg, task, run)
    assert {"vqa": "overall", "vgd": "acc", "itm": "rsum"}[task.name] in metrics
    assert ORIGINAL in (run.folder / "log.txt").read_text()
    assert (run.folder / "epoch1.pkl").is_file()


# --------------------------------------------------------------------------- missing features


def test_missing_vqa_feature_names_the_original_folder_and_coco_name(tree):
    _, data, _, _ = tree
    iid = VAL_IMAGE_IDS[3]
    folder = data / "vqa" / "bua-r101-max100" / "val2014"
    task = task_on(VQATask, data, ANSWER_DICT="core/data/vqa_answer_dict.json")
    task.prepare()
    with moved_away(folder / f"COCO_val2014_{iid:012d}.jpg.npz"):
        with pytest.raises(FeatureError) as e:
            task.dataset("val")
    msg = str(e.value)
    assert f"no feature file for image id {iid}" in msg
    assert f"looked for '*_{iid:012d}.jpg.npz' in {folder};" in msg


def test_missing_vgd_feature_names_both_patterns(tree):
    _, data, ids, _ = tree
    task = task_on(VGDTask, data, DATASET="refcocog")
    task.prepare()
    iid = ids[0]
    with moved_away(vgd_feature_file(data, iid, 0)):
        with pytest.raises(FeatureError) as e:
            task.dataset("train+val+test")
    assert (f"looked for '*_{iid:012d}.jpg.npz' or '{iid}.npz' in "
            f"{data / 'vgd' / 'bua-r101-fix100'};") in str(e.value)


def test_missing_flickr_feature_shows_a_flickr_name_not_a_coco_one(tree):
    _, data, _, names = tree
    task = task_on(ITMTask, data, DATASET="flickr", SUBSET=ITM_IMAGES, MAX_REGIONS=36)
    task.prepare()
    flickr_id = int(names[1].split(".")[0])
    with moved_away(data / "itm" / "flickr_bua-r101-fix36" / f"{names[1]}.npz"):
        with pytest.raises(FeatureError) as e:
            task.dataset("dev")
    msg = str(e.value)
    assert f"no feature file for image id {flickr_id} (needed by image {names[1]} of dev)" in msg
    assert (f"looked for '{flickr_id}.jpg.npz' or '{flickr_id}.npz' in "
            f"{data / 'itm' / 'flickr_bua-r101-fix36'};") in msg
    assert "COCO" not in msg and f"{flickr_id:012d}" not in msg


# --------------------------------------------------------------------------- choosing the layout


def test_explicit_layout_skips_detection_and_both_layouts_need_it(tmp_path):
    data = tmp_path / "data"
    build_vgd(data)
    (data / "vgd" / "feats").mkdir()                    # our folder too: ambiguous
    with pytest.raises(ConfigError, match=r"holds both data layouts for vgd: ours \(vgd/feats\) "
                       r"and the original's \(vgd/bua-r101-fix100\); set --DATA_LAYOUT"):
        task_on(VGDTask, data, DATASET="refcocog").prepare()
    task = task_on(VGDTask, data, DATASET="refcocog", DATA_LAYOUT="original")
    task.prepare()
    assert task.lines[0].startswith(f"{ORIGINAL} (DATA_LAYOUT=original); text files in "
                                    f"{data / 'vgd'}, features in {data / 'vgd' / 'bua-r101-fix100'}")
    assert len(task.dataset("val")) == 10
    ours = task_on(VGDTask, data, DATASET="refcocog", DATA_LAYOUT="ours")
    ours.prepare()
    with pytest.raises(FeatureError) as e:
        ours.dataset("val")                             # the empty vgd/feats
    assert f"in {data / 'vgd' / 'feats'};" in str(e.value)


def test_our_tree_is_detected_and_bad_layout_values_fail(vqa_val_root):
    root, _ = vqa_val_root
    task = task_on(VQATask, root, ANSWER_DICT="core/data/vqa_answer_dict.json")
    task.prepare()
    assert task.lines[0] == (f"data layout: ours (found coco_extract, vqa/*_questions.json in "
                             f"{root}); text files in {root / 'vqa'}, features in "
                             f"{root / 'coco_extract'} (see dataset_setup.md)")
    with pytest.raises(ConfigError, match="DATA_LAYOUT = 'mmnas' is not one of 'auto', "
                       "'ours', 'original'"):
        task_on(VQATask, root, DATA_LAYOUT="mmnas").prepare()
    with pytest.raises(ConfigError, match="DATA_LAYOUT=original does not apply to "
                       "--DATASET=demo"):
        task_on(VQATask, root, DATASET="demo", DATA_LAYOUT="original").prepare()
