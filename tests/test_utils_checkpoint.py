"""Checkpoints (utils/checkpoint.py): the original's released format loads; ours are
self-describing and atomic; a wrong or broken one is named."""
from pathlib import Path

import pytest
import torch

from core.arch import load_arch
from core.config import resolve
from core.model import Net, PooledFusionHead, fixed_backbone
from core.tasks.vqa import VQATask
from netkit import batch, fixed_net, small_cfg
from releasedkit import released_names
from utils.checkpoint import (CheckpointError, load_checkpoint, load_weights, map_original_keys,
                              save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def small_arch():
    cfg = small_cfg(ENC_BLOCKS=2, DEC_BLOCKS=3)
    from core.arch import Arch
    return cfg, Arch(("self_att_16", "feed_forward"),
                     ("rel_self_att_16", "guided_att_16", "feed_forward"))


def test_released_checkpoint_loads_unchanged(tmp_path):
    cfg, arch = small_arch()
    trained = fixed_net(cfg, arch, seed=1).eval()
    released = {"state_dict": released_names(trained.state_dict()), "net_optim": {},
                "epoch": 13}
    assert "module.backnone.cells_enc.0.dag.0.0.mhatt.linear_q.weight" in released["state_dict"]
    assert "module.attflat_y.linear_merge.weight" in released["state_dict"]
    path = tmp_path / "epoch13.pkl"
    torch.save(released, path)                    # as the original wrote it
    fresh = fixed_net(cfg, arch, seed=2).eval()
    load_weights(fresh, load_checkpoint(path)["state_dict"], str(path),
                 VQATask.original_key_prefixes)
    b = batch(cfg)
    assert torch.equal(fresh(b), trained(b))


def test_key_mapping_is_documented_by_example():
    mapped = map_original_keys({"module.backnone.cells_dec.0.dag.3.0.mhatt.linear_r.weight": 1,
                                "module.backnone.cells_enc.0.dag.0.0.ln.a_2": 2,
                                "module.imgfeat_linear.bias": 3, "module.linear_y_rel.weight": 4,
                                "module.attflat_x.linear_merge.weight": 5,
                                "module.proj_norm.a_2": 6, "module.lstm.weight_ih_l0": 7},
                               VQATask.original_key_prefixes)
    assert mapped == {"backbone.dec_list.3.mhatt.linear_r.weight": 1,
                      "backbone.enc_list.0.norm.a_2": 2, "img_feat_linear.bias": 3,
                      "backbone.linear_rel_img.weight": 4,
                      "head.attflat_lang.linear_merge.weight": 5, "head.proj_norm.a_2": 6,
                      "lstm.weight_ih_l0": 7}


def test_wrong_vocabulary_is_named(tmp_path):
    cfg, arch = small_arch()
    net = fixed_net(cfg, arch)
    state = dict(net.state_dict())
    state["embedding.weight"] = torch.zeros(99, cfg.WORD_EMBED_SIZE)
    with pytest.raises(CheckpointError, match=r"embedding.weight: checkpoint \[99, 16\], "
                                              r"network \[30, 16\]"):
        load_weights(net, state, "x.pkl")


def test_our_checkpoint_is_self_describing_and_weights_only(tmp_path):
    cfg, arch = small_arch()
    net = fixed_net(cfg, arch)
    optim = torch.optim.Adam(net.parameters())
    net(batch(cfg)).sum().backward()
    optim.step()
    from utils.checkpoint import rng_state, set_rng_state
    path = tmp_path / "epoch1.pkl"
    save_checkpoint(path, {"kind": "train", "config": cfg.to_dict(), "arch": arch.to_json(),
                           "meta": {"vocab_size": 30}, "epoch": 1, "step": 5,
                           "state_dict": net.state_dict(), "net_optim": optim.state_dict(),
                           "rng": rng_state(torch.Generator().manual_seed(4))})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "mmnas-v1" and ckpt["config"]["HSIZE"] == 32
    assert ckpt["arch"]["dec"][0] == ["rel_self_att_16"]
    # the RNG state restores exactly
    gen = torch.Generator()
    set_rng_state(ckpt["rng"], gen)
    expected = torch.Generator().manual_seed(4)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=expected))
    # optimiser state round-trips
    optim2 = torch.optim.Adam(fixed_net(cfg, arch).parameters())
    optim2.load_state_dict(ckpt["net_optim"])


def test_shipped_architecture_builds_at_paper_size():
    cfg = small_cfg(HSIZE=512, FLAT_MLP_SIZE=512, REL_SIZE=64, ENC_BLOCKS=12, DEC_BLOCKS=18,
                    WORD_EMBED_SIZE=300, IMG_FEAT_SIZE=2048)
    net = fixed_net(cfg, load_arch("arch/mmnas_vqa.json", 0, 12, 18))
    names = net.state_dict().keys()
    assert "backbone.dec_list.6.mhatt.linear_r.weight" in names     # dec 6 is RSA
    assert net.backbone.dec_list[6].mhatt.heads == 8


def _small_net(vocab_size, n_answers=10):
    cfg = resolve("vqa", "train", {"HSIZE": 64, "FLAT_MLP_SIZE": 64, "REL_SIZE": 16,
                                   "DATASET": "demo"})
    arch = load_arch(REPO / "arch" / "mcan.json", 0, 12, 18)
    return Net(vocab_size, None, cfg, fixed_backbone(cfg, arch), PooledFusionHead(cfg, n_answers))


@pytest.fixture(scope="module")
def net_state():
    torch.manual_seed(0)
    return _small_net(20).state_dict()


def test_checkpoint_round_trip(tmp_path, net_state):
    path = tmp_path / "ok.pkl"
    save_checkpoint(path, {"state_dict": net_state, "epoch": 3})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "mmnas-v1" and ckpt["epoch"] == 3
    net = _small_net(20)
    load_weights(net, ckpt["state_dict"], str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_state[k]), k


def test_checkpoint_with_other_vocabulary_names_key_and_shapes(tmp_path, net_state):
    path = tmp_path / "epoch3.pkl"
    save_checkpoint(path, {"state_dict": net_state})
    other = _small_net(25)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(other, load_checkpoint(path)["state_dict"], str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not fit this network")
    assert "shape" in msg and "embedding.weight" in msg
    assert "checkpoint [20, 300], network [25, 300]" in msg
    for k, v in other.state_dict().items():       # nothing half-loaded
        assert torch.equal(v, before[k]), k


def test_checkpoint_with_other_answer_set_and_missing_keys(tmp_path, net_state):
    path = tmp_path / "epoch3.pkl"
    state = dict(net_state)
    state.pop("lstm.weight_ih_l0")
    state["extra.weight"] = torch.zeros(2)
    save_checkpoint(path, {"state_dict": state})
    with pytest.raises(CheckpointError) as e:
        load_weights(_small_net(20, n_answers=11), load_checkpoint(path)["state_dict"],
                     str(path))
    msg = str(e.value)
    assert "head.proj.weight: checkpoint [10, 128], network [11, 128]" in msg
    assert "missing" in msg and "lstm.weight_ih_l0" in msg
    assert "fit nothing" in msg and "extra.weight" in msg


def test_released_checkpoint_names_are_mapped(tmp_path, net_state):
    from releasedkit import released_names
    released = released_names(net_state, "vqa")
    assert "module.backnone.cells_dec.0.dag.2.0.ln.a_2" in released
    from core.tasks.vqa import VQATask
    net = _small_net(20)
    load_weights(net, released, "released.pkl", VQATask.original_key_prefixes)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_state[k]), k


def test_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "epoch13.pkl")
    assert str(e.value) == f"checkpoint {tmp_path / 'epoch13.pkl'} does not exist"


def test_checkpoint_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "epoch1.pkl"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": {}}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path}: expected a dict with a 'state_dict' entry"
