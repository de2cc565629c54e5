"""Visual grounding: boxes, targets, loss masking, Acc@0.5 — hand-computed values."""
import math
from pathlib import Path

import pytest
import torch

from conftest import latin1_into
from core.tasks.vgd import VGDHead, VGDTask, refer
from core.tasks.vgd.boxes import clip_boxes, decode_deltas, encode_deltas, iou, xywh_to_xyxy
from netkit import fixed_net, small_cfg
from utils.checkpoint import load_weights

DATA = Path(__file__).resolve().parent / "data"


def test_iou_uses_plus_one_widths():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])                   # 10 x 10 = 100
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0],                  # overlap 5 x 5 = 25
                      [0.0, 0.0, 9.0, 9.0],
                      [10.0, 0.0, 19.0, 9.0],                  # touching, no shared pixel
                      [9.0, 9.0, 18.0, 18.0]])                 # one shared pixel
    assert iou(a, b)[0].tolist() == pytest.approx([25 / 175, 1.0, 0.0, 1 / 199])


def test_xywh_to_xyxy_is_inclusive():
    assert xywh_to_xyxy(torch.tensor([10.0, 20.0, 30.0, 40.0])).tolist() == [10, 20, 39, 59]


def test_deltas_by_hand_and_round_trip():
    proposal = torch.tensor([10.0, 10.0, 29.0, 49.0])          # w 20, h 40, centre (20, 30)
    gt = torch.tensor([12.0, 8.0, 35.0, 47.0])                 # w 24, h 40, centre (24, 28)
    d = encode_deltas(proposal, gt)
    assert d.tolist() == pytest.approx([(4 / 20) / 0.1, (-2 / 40) / 0.1,
                                        math.log(24 / 20) / 0.2, 0.0], abs=1e-6)
    # py-faster-rcnn's inverse puts x2 at cx + w/2 (no -1): one pixel right/below
    assert decode_deltas(proposal, d).tolist() == pytest.approx([12, 8, 36, 48], abs=1e-4)


def test_clip_to_image():
    boxes = torch.tensor([[-5.0, 3.0, 700.0, 500.0], [10.0, -1.0, 20.0, 30.0]])
    assert clip_boxes(boxes, 480, 640).tolist() == [[0, 3, 639, 479], [10, 0, 20, 30]]
    per_box = clip_boxes(boxes, torch.tensor([100.0, 20.0]), torch.tensor([50.0, 15.0]))
    assert per_box.tolist() == [[0, 3, 49, 99], [10, 0, 14, 19]]


def _task():
    return VGDTask(small_cfg(DATASET="demo"), print)


def _hand_batch():
    """One image, 3 proposals + 1 padded row; GT x 0..9, y 0..9."""
    boxes = torch.tensor([[[0.0, 0.0, 9.0, 9.0],        # IoU 1
                           [0.0, 0.0, 9.0, 14.0],       # IoU 100/150 = 2/3
                           [20.0, 20.0, 29.0, 29.0],    # IoU 0
                           [0.0, 0.0, 0.0, 0.0]]])      # padding
    img = torch.ones(1, 4, 24)
    img[0, 3] = 0
    return {"boxes": boxes, "img": img, "gt": torch.tensor([[0.0, 0.0, 9.0, 9.0]]),
            "size": torch.tensor([[100.0, 100.0]]), "sent_id": [7]}


def test_loss_targets_by_hand():
    batch = _hand_batch()
    scores = torch.tensor([[0.5, 0.0, -1.0, 30.0]])      # a huge score on the padded row
    deltas = torch.zeros(1, 4, 4)
    loss = _task().loss((scores, deltas), batch)
    # score target: IoU of positives normalised: [1, 2/3] / (5/3) = [0.6, 0.4]; the padded
    # row is outside the softmax, so its score of 30 changes nothing
    log_p = torch.log_softmax(torch.tensor([0.5, 0.0, -1.0]), 0)
    kl = 0.6 * (math.log(0.6) - log_p[0]) + 0.4 * (math.log(0.4) - log_p[1])
    # regression: proposal 0 needs zero deltas; proposal 1 (h 15 -> 10, cy 7.5 -> 5)
    d1 = torch.tensor([0.0, (-2.5 / 15) / 0.1, 0.0, math.log(10 / 15) / 0.2])
    smooth = sum(float(torch.nn.functional.smooth_l1_loss(v, torch.zeros(()), reduction="sum"))
                 for v in d1)
    assert float(loss) == pytest.approx((float(kl) + 0.5 * smooth) / 2, rel=1e-5)


def test_padded_proposals_never_win_and_acc_uses_regression():
    batch = _hand_batch()
    scores = torch.tensor([[0.0, 5.0, -1.0, 99.0]])       # padding highest, then proposal 1
    deltas = torch.zeros(1, 4, 4)
    [pred] = _task().predict((scores, deltas), batch)
    assert pred["sent_id"] == 7 and pred["box"] == pytest.approx([0, 0, 10, 15])
    assert pred["correct"]                                # IoU 100 / 176 = 0.57
    deltas[0, 1] = encode_deltas(batch["boxes"][0, 1], batch["gt"][0])
    [pred] = _task().predict((scores, deltas), batch)
    assert pred["box"] == pytest.approx([0, 0, 10, 10], abs=1e-4)   # regressed onto the GT
    metric = _task().metric([pred, {**pred, "correct": False}], None)
    assert metric == {"acc": 50.0, "n": 2}


def test_attention_reading_outlines_the_predicted_and_the_true_box():
    batch = _hand_batch()
    scores = torch.tensor([[0.0, 5.0, -1.0, 99.0]])   # proposal 1: e^5 / (1 + e^5 + e^-1) = 0.991
    lines, marked, regions = _task().attention_reading((scores, torch.zeros(1, 4, 4)), batch, {})
    assert lines == ["predicted box score 0.991", "IoU with true 0.568", "correct (IoU >= 0.5)"]
    assert marked["predicted"] == (pytest.approx([0, 0, 10, 15]), "#2ca02c")
    assert marked["true"] == ([0.0, 0.0, 9.0, 9.0], "#d62728")
    assert regions.argmax() == 1 and regions[3] == 0 and regions.sum() == pytest.approx(1.0)


def test_released_vgd_checkpoint_loads():
    cfg = small_cfg(DATASET="demo")
    from core.arch import Arch
    arch = Arch(("self_att_16", "feed_forward"),
                ("rel_self_att_16", "guided_att_16", "feed_forward", "guided_att_16"))
    net = fixed_net(cfg, arch)
    net.head = VGDHead(cfg)
    from releasedkit import released_names
    released = released_names(net.state_dict(), "vgd")
    assert "module.proj_reg.weight" in released and "module.attfc_y.bias" in released
    fresh = fixed_net(cfg, arch, seed=3)
    fresh.head = VGDHead(cfg)
    load_weights(fresh, released, "released.pkl", VGDTask.original_key_prefixes)
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_non_utf8_grounding_split_names_the_file(tmp_path):
    from core.config import resolve
    from core.tasks.vgd import VGDTask
    folder = tmp_path / "vgd" / "refcocog"
    splits = refer.convert("refcocog", DATA / "refcocog")
    refer.write_splits(splits, folder)
    path = folder / "val.json"
    offset = latin1_into(path, splits["val"][0]["sent"])
    task = VGDTask(resolve("vgd", "train", {"DATA_ROOT": str(tmp_path), "DATASET": "refcocog",
                                           "WORD_VECTORS": "hash"}), log=lambda m: None)
    with pytest.raises(ValueError) as e:
        task.prepare()
    assert str(e.value).startswith(f"{path}: not UTF-8 text: byte 0xe9 at byte offset "
                                   f"{offset:,} (line ")
