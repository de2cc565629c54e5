"""Pictures: each drawing function on small inputs; the PNG decodes at its size and the
numbers drawn are the run's (softmax(alpha), the architecture's operators, the curves, the
attention weights)."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core import pictures
from core.mixed import MixedOp
from core.model import AttFlat, Backbone
from core.ops import OpSpec
from utils import plots

REPO = Path(__file__).resolve().parents[1]
SPEC = OpSpec(16, 0.0, 8)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def supernet(seed: int = 0):
    torch.manual_seed(seed)
    enc = [MixedOp(["self_att_16", "feed_forward"], SPEC) for _ in range(2)]
    dec = [MixedOp(["self_att_16", "guided_att_16", "feed_forward"], SPEC) for _ in range(3)]
    for m in enc + dec:
        m.alpha.data.normal_()
    return SimpleNamespace(backbone=Backbone(enc, dec, 8))


def fake_run(folder):
    lines = []
    return SimpleNamespace(main=True, folder=folder, log=lines.append, lines=lines)


def softmaxes(blocks):
    return [torch.softmax(m.alpha.detach(), -1).tolist() for m in blocks]


def test_alpha_heatmap_draws_softmax_of_alpha_at_its_size(tmp_path):
    net = supernet()
    sides = {s: (list(getattr(net.backbone, f"{s}_list")[0].names),
                 [m.probs().tolist() for m in getattr(net.backbone, f"{s}_list")])
             for s in ("enc", "dec")}
    drawn = plots.alpha_heatmap(tmp_path / "a.png", sides, size=(500, 300))
    assert png_size(tmp_path / "a.png") == (500, 300)
    assert drawn["dec"].shape == (3, 3)
    np.testing.assert_allclose(drawn["enc"], softmaxes(net.backbone.enc_list), rtol=1e-6)
    np.testing.assert_allclose(drawn["dec"].sum(1), 1.0, rtol=1e-6)


def test_trajectories_hold_each_epochs_probabilities(tmp_path):
    per_epoch = np.random.default_rng(0).dirichlet([1, 1, 1], size=(4, 5))   # [epochs, blocks, ops]
    drawn = plots.alpha_trajectories(tmp_path / "t.png", [1, 2, 3, 4],
                                     {"dec": (["a", "b", "c"], per_epoch)}, cols=3)
    np.testing.assert_array_equal(drawn["dec"], per_epoch)
    assert png_size(tmp_path / "t.png") == (190 * 3, 150 * 2 + 90)     # 5 panels, 3 a row


def test_search_epoch_draws_alphas_trajectories_arch_curves_and_redoes_resumed_epochs(tmp_path):
    run, net = fake_run(tmp_path), supernet()
    first = softmaxes(net.backbone.dec_list)
    pictures.search_epoch(run, net, 1, 2.5, {"overall": 30.0, "n_questions": 96, "n": 96})
    for m in net.backbone.dec_list:
        m.alpha.data[1] += 3.0                 # guided attention wins every decoder block
    pictures.search_epoch(run, net, 2, 2.0, {"overall": 40.0})
    folder = tmp_path / "pictures"
    history = json.loads((folder / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    np.testing.assert_allclose(history[0]["alphas"]["dec"], first, rtol=1e-6)
    np.testing.assert_allclose(history[1]["alphas"]["dec"], softmaxes(net.backbone.dec_list),
                               rtol=1e-6)
    assert history[1]["loss"] == 2.0 and history[1]["arch split overall"] == 40.0
    assert set(history[0]) == {"epoch", "loss", "arch split overall", "alphas"}  # no counts
    for name in ("alphas_epoch1.png", "alphas_epoch2.png", "alpha_trajectories.png",
                 "arch_epoch2.png", "curves.png"):
        w, h = png_size(folder / name)
        assert w > 300 and h > 200, name
    assert png_size(folder / "alpha_trajectories.png") == (190 * 6, 150 * 1 + 90)
    # a resumed run redoes epoch 2: its entry is replaced, the later ones dropped
    pictures.search_epoch(run, net, 2, 1.5, {"overall": 41.0})
    history = json.loads((folder / "history.json").read_text())
    assert [(r["epoch"], r["loss"]) for r in history] == [(1, 2.5), (2, 1.5)]


def test_pictures_false_keeps_the_numbers_and_draws_nothing(tmp_path):
    run, net = fake_run(tmp_path), supernet()
    pictures.search_epoch(run, net, 1, 2.5, {"overall": 30.0}, drawn=False)
    pictures.train_epoch(run, 2, 0.5, {"epoch": 2, "val": {"overall": 50.0}}, drawn=False)
    folder = tmp_path / "pictures"
    assert sorted(p.name for p in folder.iterdir()) == ["history.json"]
    history = json.loads((folder / "history.json").read_text())
    assert [(r["epoch"], r["loss"]) for r in history] == [(1, 2.5), (2, 0.5)]
    assert history[1]["val overall"] == 50.0 and run.lines == []


def test_a_picture_that_cannot_be_written_is_a_warning(tmp_path):
    (tmp_path / "pictures").write_text("a file where the folder should be")
    run = fake_run(tmp_path)
    pictures.train_epoch(run, 1, 0.5, {"epoch": 1, "val": {"overall": 50.0}})
    assert len(run.lines) == 1 and run.lines[0].startswith("warning: pictures of epoch 1 not "
                                                           "written to")


def test_train_curves_are_the_loss_and_the_metrics_of_each_epoch(tmp_path):
    run = fake_run(tmp_path)
    for epoch, (loss, acc) in enumerate([(3.0, 20.0), (2.0, 35.5), (1.5, 41.0)], 1):
        pictures.train_epoch(run, epoch, loss, {"epoch": epoch, "val": {
            "overall": acc, "perAnswerType": {"yes/no": 1.0}}})
    records = json.loads((tmp_path / "pictures" / "history.json").read_text())
    drawn = plots.curves(tmp_path / "c.png", records, size=(640, 320))
    assert drawn == {"loss": [(1, 3.0), (2, 2.0), (3, 1.5)],
                     "val overall": [(1, 20.0), (2, 35.5), (3, 41.0)]}
    assert png_size(tmp_path / "c.png") == (640, 320)
    assert png_size(tmp_path / "pictures" / "curves.png") == (900, 360)


def test_arch_diagram_colours_each_block_by_its_operator(tmp_path):
    entry = json.loads((REPO / "arch" / "mmnas_vqa.json").read_text())["epoch0"]
    drawn = plots.arch_diagram(tmp_path / "arch.png", entry)
    dec = [b[0] for b in entry["dec"]]
    assert [op for op, _ in drawn["dec"]] == dec
    assert all(colour == plots.op_colour(op) for op, colour in drawn["enc"] + drawn["dec"])
    assert len({c for _, c in drawn["dec"]}) == len(set(dec)) == 4
    assert drawn["guided"] == [i for i, op in enumerate(dec) if op == "guided_att_64"]
    assert drawn["enc_reads_image"] == []
    assert png_size(tmp_path / "arch.png") == (520, 26 * 18 + 150)


def test_visualize_arch_command_and_its_error(tmp_path, capsys):
    import visualize
    out = tmp_path / "itm.png"
    visualize.main(["arch", str(REPO / "arch" / "mmnas_itm.json"), "--out", str(out)])
    assert png_size(out) == (520, 26 * 18 + 150)
    assert "10 decoder blocks read the encoder" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        visualize.main(["arch", str(REPO / "arch" / "mmnas_itm.json"), "--epoch", "3"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no key 'epoch3'; keys present: epoch0" in err


def test_region_heat_spreads_each_weight_over_its_box():
    heat = plots.region_heat((100, 200), [[0, 0, 100, 100], [100, 0, 200, 50]], [0.8, 0.2],
                             cells=8)
    assert heat.shape == (4, 8)
    np.testing.assert_allclose(heat[:, :4], 1.0)
    np.testing.assert_allclose(heat[:2, 4:], 0.25)
    np.testing.assert_allclose(heat[2:, 4:], 0.0)


@pytest.mark.parametrize("with_image", [False, True])
def test_attention_map_draws_weights_words_and_answer(tmp_path, with_image):
    image = np.zeros((120, 160, 3), np.uint8)
    image[..., 0] = 255                                 # all red
    boxes = np.array([[0, 0, 40, 40], [80, 60, 160, 120], [10, 10, 150, 110]], float)
    drawn = plots.attention_map(tmp_path / "m.png", (120, 160), boxes, [0.1, 0.7, 0.2],
                                ["what", "color"], [0.25, 0.75], ["answer: red 0.9"],
                                image if with_image else None,
                                {"true": ([0, 0, 40, 40], "#2ca02c")}, size=(600, 480))
    assert png_size(tmp_path / "m.png") == (600, 480)
    assert drawn["top_regions"] == [1, 2, 0]
    assert drawn["words"] == [("what", 0.25), ("color", 0.75)]
    assert drawn["lines"] == ["answer: red 0.9"] and "true" in drawn["marked"]
    assert drawn["background"] == ("image" if with_image else "blank")
    np.testing.assert_allclose(drawn["heat"], plots.region_heat((120, 160), boxes,
                                                                [0.1, 0.7, 0.2]))
    # the red image shows through the heat over a large part of the picture, the blank
    # canvas does not
    with Image.open(tmp_path / "m.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    red = ((rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)).mean()
    assert (red > 0.15) == with_image and (red < 0.05) != with_image


def test_find_image_looks_under_images(tmp_path):
    folder = tmp_path / "images" / "val2014"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 6), "red").save(folder / "COCO_val2014_000000000042.jpg")
    found = pictures.find_image(tmp_path, 42)
    assert found == folder / "COCO_val2014_000000000042.jpg"
    assert pictures.load_image(found).shape == (6, 8, 3)
    assert pictures.find_image(tmp_path, 43) is None and pictures.find_image(tmp_path / "x", 42) \
        is None


def test_pooling_attention_reads_the_heads_masked_softmax():
    torch.manual_seed(0)
    head = torch.nn.Module()
    head.attflat_img, head.attflat_lang = AttFlat(16, 8, 1, 4, 0.1), AttFlat(16, 8, 1, 4, 0.1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, batch):
            return self.head.attflat_img(batch["img"], batch["img_mask"]) + \
                self.head.attflat_lang(batch["txt"], batch["txt_mask"])

    img_mask = torch.tensor([False, False, True])[None, None, None]
    batch = {"img": torch.randn(1, 3, 16), "img_mask": img_mask,
             "txt": torch.randn(1, 4, 16), "txt_mask": torch.zeros(1, 1, 1, 4, dtype=torch.bool)}
    net = Net().train()
    out, att = pictures.pooling_attention(net, batch)
    assert not net.training and not head.attflat_img._forward_hooks    # hooks removed
    assert att["img"][0, 2] == 0 and float(att["img"].sum()) == pytest.approx(1.0)
    logits = head.attflat_lang.mlp(batch["txt"])[..., 0]
    np.testing.assert_allclose(att["lang"], torch.softmax(logits, -1).detach(), rtol=1e-5)
    assert out.shape == (1, 4)
