"""Non-finite numbers (core/finite.py): a NaN loss or gradient stops the run naming the step and
the samples, before any weight, alpha or checkpoint changes; fp16 loss scaling still skips."""
from pathlib import Path

import numpy as np
import pytest
import torch

import core.data.pack as pack_mod
from conftest import assert_nothing_saved, first_question_ids, run_folder, script_error, tiny_args
from core.finite import NonFiniteError
from core.loop import weight_step
from core.mixed import Architect
from core.run import Run, main
from core.tasks.vqa import VQATask
from core.train import run_train


def nan_packed_store(root: Path) -> None:
    """A store packed before the pack-time check existed (or hit by a bit flip): NaN rows."""
    store = root / "coco_extract" / "packed"
    pack_mod.pack([root / "coco_extract" / "val2014"], store, dtype="float32", progress=False)
    rows = np.memmap(store / "feats.f32", dtype=np.float32, mode="r+")
    rows[:] = np.nan
    rows.flush()
    del rows


def test_nan_loss_stops_training_and_leaves_the_earlier_checkpoint(vqa_val_root, capsys):
    """Epoch 1 trains; its features then turn NaN: resuming stops at the first step of epoch
    2, naming it and the batch's question ids, and epoch1.pkl / 'last' stay as they were."""
    root, _ = vqa_val_root
    main(VQATask, "train", run_train, tiny_args(root, "train"))
    folder = run_folder(root)
    before = {p.name: p.read_bytes() for p in folder.iterdir()
              if p.is_file() and p.name not in ("log.txt", "config.yaml")}  # both rewritten
    assert {"epoch1.pkl", "last"} <= set(before)
    nan_packed_store(root)
    message = script_error(capsys, "train", root, "--RESUME", "--MAX_EPOCH=2")
    assert message.startswith("epoch 2, step 2: the loss is nan on the batch of question "
                              "ids [")
    listed = [int(i) for i in message.split("[")[1].split("]")[0].split(", ")]
    assert sorted(listed) == sorted(first_question_ids(root))
    assert "nothing updated or saved" in message
    after = {p.name: p.read_bytes() for p in folder.iterdir()
             if p.is_file() and p.name not in ("log.txt", "config.yaml")}
    assert after == before


def test_nan_loss_stops_the_search_before_arch_json(vqa_val_root, capsys):
    root, _ = vqa_val_root
    nan_packed_store(root)
    message = script_error(capsys, "search", root, "--ARCH_START_EPOCH=0",
                           "--ARCH_STEP_EVERY=1")
    assert message.startswith("epoch 1, step 1: the loss is nan on the batch of question ids [")
    assert_nothing_saved(root, "search")


class TinyTask:
    """The task seam weight_step needs: a sum-of-squares loss and a batch with ids."""
    batch_ids = ("qid", "question ids")
    describe_batch = VQATask.describe_batch

    @staticmethod
    def loss(out, batch):
        return (out ** 2).sum()


def tiny_step(net, hook, scaler=None):
    cfg = type("Cfg", (), {"AMP": "off", "GRAD_CLIP": 1.0})()
    net[0].weight.register_hook(hook)
    optim = torch.optim.Adam(net.parameters(), lr=0.1)
    batch = {"x": torch.ones(2, 3), "qid": [7, 9]}
    net.forward = lambda b, f=net.forward: f(b["x"])
    return weight_step(net, TinyTask(), batch, optim, list(net.parameters()), cfg,
                       torch.device("cpu"), scaler, where="epoch 4, step 120")


def test_nan_gradient_with_a_finite_loss_stops_before_the_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteError) as e:
        tiny_step(net, lambda g: g * float("nan"))
    assert str(e.value).startswith("epoch 4, step 120: the gradient of 0.weight holds 6 "
                                   "non-finite value(s) on the batch of question ids [7, 9]")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_inf_gradient_under_loss_scaling_is_skipped_not_an_error():
    """fp16's GradScaler sees inf gradients on purpose: it skips the step and lowers the scale."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    tiny_step(net, lambda g: g * float("inf"), scaler)
    assert scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_nan_architecture_loss_leaves_alpha_unchanged():
    from core.config import resolve
    from core.model import search_backbone
    cfg = resolve("vqa", "search", {"HSIZE": 64, "ENC_BLOCKS": 1, "DEC_BLOCKS": 2,
                                    "DATASET": "demo"})
    backbone = search_backbone(cfg)
    architect = Architect(backbone, 0.1, (0.0, 0.999), "full")
    alphas = [m.alpha.detach().clone() for m in architect.mixed]

    def nan_loss():
        return sum((m.gates * float("nan")).sum() for m in architect.mixed)
    with pytest.raises(NonFiniteError) as e:
        architect.step(nan_loss, torch.Generator().manual_seed(0),
                       lambda problem: f"epoch 2, step 40, architecture step: {problem}")
    assert str(e.value) == "epoch 2, step 40, architecture step: the loss is nan"
    assert all(torch.equal(m.alpha.detach(), a) for m, a in zip(architect.mixed, alphas))
    assert all(m.gates is None for m in architect.mixed)


def test_checkpoint_with_nan_weights_is_refused_and_the_old_one_kept(tmp_path):
    run = Run(tmp_path / "run", resume=False)
    good = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    path = run.checkpoint(1, good)
    old = path.read_bytes()
    bad = {"state_dict": {"w": torch.ones(3), "head.b": torch.tensor([1.0, float("inf")])},
           "net_optim": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}
    with pytest.raises(NonFiniteError) as e:
        run.checkpoint(1, bad)
    assert str(e.value) == (f"checkpoint {path}: refused to write it: state_dict.head.b holds 1 "
                            f"non-finite value(s) (2 tensor(s) in all); earlier checkpoints are "
                            f"left as they were")
    assert path.read_bytes() == old and (tmp_path / "run" / "last").read_text() == "epoch1.pkl\n"
    with pytest.raises(NonFiniteError):
        run.checkpoint(2, bad)
    assert not (tmp_path / "run" / "epoch2.pkl").exists()
