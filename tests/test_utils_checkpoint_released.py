"""The original's released checkpoints (and search supernets) load, every tensor where the
original uses it.

Files are written with exactly the names and shapes of ``tests/data/released_layout`` (the
original's ``Net_Full`` at the paper config) and random values; the network loaded from them
must compute what the original computes with those tensors. ``original_forward`` below is
the original's forward pass (``full_*.py``, ``modules.py``) written out over the released
names, so a tensor mapped to the wrong place changes the output.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.arch import Arch, load_arch
from core.config import resolve
from core.loop import build_net
from core.mixed import mixed_ops
from core.model import fixed_backbone, search_backbone
from core.relations import image_relation
from core.search import warm_start
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from core.tasks.vqa import VQATask
from utils.checkpoint import CheckpointError, load_checkpoint, load_weights

REPO = Path(__file__).resolve().parents[1]
LAYOUT = Path(__file__).resolve().parent / "data" / "released_layout"
TASKS = {"vqa": VQATask, "vgd": VGDTask, "itm": ITMTask}
V = 23              # vocabulary size chosen for the tests
ANSWERS = 3129      # the released VQA answer set
# The original's search spaces, in its candidate order (ops_adapter.py 'enc_safe', 'dec_safe').
ORIGINAL_ENC = ["self_att_64", "feed_forward"]
ORIGINAL_DEC = ["self_att_64", "rel_self_att_64", "guided_att_64", "feed_forward"]


def read_layout(task: str) -> dict[str, list[int]]:
    """name -> shape of a released file, ``V`` replaced by the test vocabulary size."""
    out = {}
    for line in (LAYOUT / f"{task}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            out[name] = [V if d.strip() == "V" else int(d) for d in shape.strip("[]").split(",")]
    return out


def random_state(layout: dict, seed: int) -> dict:
    """Random tensors of the given shapes: windows of one random pool (50 M fresh normal
    draws per paper-size file would dominate the test), each at its own offset."""
    size = max(math.prod(shape) for shape in layout.values())
    pool = 0.05 * torch.randn(size, generator=torch.Generator().manual_seed(seed))
    out, offset = {}, 0
    for key, shape in layout.items():
        n, start = math.prod(shape), offset % len(pool)
        flat = pool[start:start + n]
        if len(flat) < n:
            flat = torch.cat([flat, pool[:n - len(flat)]])
        out[key] = flat.clone().view(shape)
        offset += n + 7919
    return out


def make_task(name: str, **over):
    """A task with a vocabulary of V words (and the 3,129 answers for VQA), no data."""
    task = TASKS[name](resolve(name, "train", over), log=lambda line: None)
    task.vocab = {f"w{i}": i for i in range(V)}
    if name == "vqa":
        task.ans_to_ix = {f"a{i}": i for i in range(ANSWERS)}
        task.ix_to_ans = list(task.ans_to_ix)
    return task


def paper_arch(task: str):
    return load_arch(REPO / "arch" / f"mmnas_{task}.json", 0, 12, 18)


def sample_batch(seed: int = 0) -> dict:
    """Two samples: 6 tokens (the second with 2 padded), 8 regions (the second with 1)."""
    g = torch.Generator().manual_seed(seed)
    txt = torch.randint(3, V, (2, 6), generator=g)
    txt[1, -2:] = 0
    img = torch.rand(2, 8, 2048, generator=g) + 0.01
    img[1, -1] = 0
    xy = torch.rand(2, 8, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 20 + torch.rand(2, 8, 2, generator=g) * 150], -1)
    boxes[1, -1] = 0
    return {"txt": txt, "img": img, "boxes": boxes}


# --- the original's forward pass over its own tensor names ---------------------------------

def original_forward(task: str, W: dict, ops: dict, block_name, batch: dict, hsize: int):
    """``Net_Full.forward`` (or ``Net_Search`` with one chosen op per block) of the original.

    ``W``: the file's state dict; ``ops``: {'enc': [...], 'dec': [...]} op names;
    ``block_name(side, i)``: where block i's tensors live in the file.
    """
    def w(name):
        return W["module." + name]

    def linear(x, name, bias=True):
        return F.linear(x, w(name + ".weight"), w(name + ".bias") if bias else None)

    def layer_norm(x, name):          # modules.LayerNorm: unbiased std, eps outside the root
        return w(name + ".a_2") * (x - x.mean(-1, keepdim=True)) / \
            (x.std(-1, keepdim=True) + 1e-6) + w(name + ".b_2")

    def mlp(x, name):
        return linear(F.relu(linear(x, name + ".fc.linear")), name + ".linear")

    def attention(q_in, kv_in, mask, name, rel=None):     # MHAtt / RelMHAtt, base 64
        b, heads = q_in.size(0), hsize // 64

        def split(t):
            return t.view(b, -1, heads, 64).transpose(1, 2)
        v = split(linear(kv_in, name + ".linear_v", False))
        k = split(linear(kv_in, name + ".linear_k", False))
        q = split(linear(q_in, name + ".linear_q", False))
        scores = q @ k.transpose(-2, -1) / math.sqrt(64)
        if rel is not None:
            r = F.relu(linear(rel, name + ".linear_r")).permute(0, 3, 1, 2)
            scores = torch.log(torch.clamp(r, min=1e-6)) + scores
        att = F.softmax(scores.masked_fill(mask, -1e9), -1) @ v
        return linear(att.transpose(1, 2).reshape(b, -1, hsize), name + ".linear_merge", False)

    def block(op, s, s_mask, pre, pre_mask, rel, name):   # norm=True, residual=True
        if op == "feed_forward":
            out = mlp(s, name + ".mlp")
        elif op.startswith("guided_att"):
            out = attention(s, pre, pre_mask, name + ".mhatt")
        elif op.startswith("rel_self_att"):
            out = attention(s, s, s_mask, name + ".mhatt", rel)
        else:
            out = attention(s, s, s_mask, name + ".mhatt")
        return layer_norm(s + out, name + ".ln")

    def attflat(x, mask, name):
        att = F.softmax(mlp(x, name + ".mlp").masked_fill(mask[:, 0, 0, :, None], -1e9), 1)
        return linear((att * x).sum(1), name + ".linear_merge")

    txt, img = batch["txt"], batch["img"]
    x_mask = (txt == 0)[:, None, None, :]
    y_mask = (img.abs().sum(-1) == 0)[:, None, None, :]
    lstm = torch.nn.LSTM(300, hsize, batch_first=True)
    lstm.load_state_dict({k[len("module.lstm."):]: v for k, v in W.items()
                          if k.startswith("module.lstm.")})
    x, _ = lstm(F.embedding(txt, w("embedding.weight")))
    y = linear(img, "imgfeat_linear")
    # the loader's box relations (core.relations follows it), then linear_y_rel + ReLU
    y_rel = F.relu(linear(image_relation(batch["boxes"], y_mask[:, 0, 0]), "linear_y_rel"))
    for i, op in enumerate(ops["enc"]):
        x = block(op, x, x_mask, None, None, None, block_name("enc", i))
    for i, op in enumerate(ops["dec"]):
        y = block(op, y, y_mask, x, x_mask, y_rel, block_name("dec", i))
    if task == "vgd":     # the original then log-softmaxes the scores for its KL loss
        fused = layer_norm(attflat(x, x_mask, "attflat_x")[:, None] + linear(y, "attfc_y"),
                           "proj_norm")
        return linear(fused, "proj_scores").squeeze(-1), linear(fused, "proj_reg")
    fused = layer_norm(attflat(x, x_mask, "attflat_x") + attflat(y, y_mask, "attflat_y"),
                       "proj_norm")
    out = linear(fused, "proj")
    return torch.sigmoid(out.squeeze(-1)) if task == "itm" else out


def released_block(side: str, i: int) -> str:
    return f"backnone.cells_{side}.0.dag.{i}.0"


# --- released (trained) checkpoints at the paper size --------------------------------------

@pytest.fixture(scope="module", params=list(TASKS))
def released(request, tmp_path_factory):
    """A released-layout file of one task loaded the way --CKPT_PATH loads it."""
    name = request.param
    layout = read_layout(name)
    state = random_state(layout, seed=len(name))
    path = tmp_path_factory.mktemp(name) / "epoch13.pkl"
    torch.save({"state_dict": state, "net_optim": {"state": {}, "param_groups": []},
                "epoch": 13}, path)
    task = make_task(name)
    arch = paper_arch(name)
    net = build_net(task.cfg, task, fixed_backbone(task.cfg, arch)).eval()
    # core/train.py: load_checkpoint, then load_weights with the task's head table
    load_weights(net, load_checkpoint(path)["state_dict"], str(path), task.original_key_prefixes)
    return name, state, task, arch, net


def test_every_released_tensor_is_a_network_tensor(released):
    name, state, task, arch, net = released
    ours = net.state_dict()
    assert len(ours) == len(state) == 213
    # each released tensor (random, so its sum is a fingerprint) is in the network once
    assert fingerprints(ours.values()) == fingerprints(state.values())


def fingerprints(tensors) -> list:
    return sorted((tuple(t.shape), t.sum().item()) for t in tensors)


def test_released_network_computes_what_the_original_computes(released):
    name, state, task, arch, net = released
    batch = sample_batch()
    with torch.no_grad():
        ours = net(batch)
        theirs = original_forward(name, state, {"enc": arch.enc, "dec": arch.dec},
                                  released_block, batch, 512)
    if name == "vgd":
        assert torch.allclose(ours[0], theirs[0], atol=1e-4)       # proposal scores
        assert torch.allclose(ours[1], theirs[1], atol=1e-4)       # box regression
    elif name == "itm":
        assert torch.allclose(torch.sigmoid(ours), theirs, atol=1e-5)
    else:
        assert ours.shape == (2, ANSWERS) and torch.allclose(ours, theirs, atol=1e-4)


def test_released_tensors_are_ours_for_the_same_thing(released):
    name, state, task, arch, net = released
    dec_rsa = arch.dec.index("rel_self_att_64")
    checks = {
        "module.imgfeat_linear.weight": net.img_feat_linear.weight,
        "module.linear_y_rel.weight": net.backbone.linear_rel_img.weight,
        f"module.backnone.cells_dec.0.dag.{dec_rsa}.0.ln.a_2": net.backbone.dec_list[dec_rsa]
        .norm.a_2,
        f"module.backnone.cells_dec.0.dag.{dec_rsa}.0.mhatt.linear_r.bias":
            net.backbone.dec_list[dec_rsa].mhatt.linear_r.bias,
        "module.backnone.cells_enc.0.dag.11.0.ln.b_2": net.backbone.enc_list[11].norm.b_2,
        "module.attflat_x.linear_merge.weight": net.head.attflat_lang.linear_merge.weight,
        "module.proj_norm.a_2": net.head.proj_norm.a_2,
    }
    if name == "vgd":
        checks.update({"module.attfc_y.weight": net.head.linear_img.weight,
                       "module.proj_scores.weight": net.head.linear_score.weight,
                       "module.proj_reg.weight": net.head.linear_reg.weight,
                       "module.proj_reg.bias": net.head.linear_reg.bias})
    else:
        checks.update({"module.attflat_y.mlp.fc.linear.weight":
                       net.head.attflat_img.mlp.fc.linear.weight,
                       "module.proj.weight": net.head.proj.weight})
    for released_name, ours in checks.items():
        assert torch.equal(state[released_name], ours.detach()), released_name


# --- the original's search supernets (hygr_*.py) as a warm start of our search -------------

def op_layout(op: str, hsize: int, rel: int) -> dict:
    """Tensors of one of the original's operators (modules.py), norm on."""
    if op == "feed_forward":
        t = {"mlp.fc.linear.weight": [4 * hsize, hsize], "mlp.fc.linear.bias": [4 * hsize],
             "mlp.linear.weight": [hsize, 4 * hsize], "mlp.linear.bias": [hsize]}
    else:
        t = {f"mhatt.linear_{n}.weight": [hsize, hsize] for n in ("v", "k", "q", "merge")}
        if op.startswith("rel_self_att"):
            t.update({"mhatt.linear_r.weight": [hsize // 64, rel],
                      "mhatt.linear_r.bias": [hsize // 64]})
    return {**t, "ln.a_2": [hsize], "ln.b_2": [hsize]}


def top_layout(task: str, cfg, n_out: int, search: bool = False) -> dict:
    """Everything outside the blocks (full_<task>.py; hygr_<task>.py with ``search``)."""
    h, rel, flat = cfg.HSIZE, cfg.REL_SIZE, cfg.FLAT_MLP_SIZE
    t = {"embedding.weight": [V, 300], "lstm.weight_ih_l0": [4 * h, 300],
         "lstm.weight_hh_l0": [4 * h, h], "lstm.bias_ih_l0": [4 * h],
         "lstm.bias_hh_l0": [4 * h], "imgfeat_linear.weight": [h, 2048],
         "imgfeat_linear.bias": [h], "linear_y_rel.weight": [rel, 4],
         "linear_y_rel.bias": [rel], "proj_norm.a_2": [2 * h], "proj_norm.b_2": [2 * h]}
    if search and task != "vgd":
        t.update({"linear_x_rel.weight": [rel, 3], "linear_x_rel.bias": [rel]})
    flats = ["attflat_x"] if task == "vgd" else ["attflat_x", "attflat_y"]
    for name in flats:
        t.update({f"{name}.mlp.fc.linear.weight": [flat, h], f"{name}.mlp.fc.linear.bias": [flat],
                  f"{name}.mlp.linear.weight": [1, flat], f"{name}.mlp.linear.bias": [1],
                  f"{name}.linear_merge.weight": [2 * h, h],
                  f"{name}.linear_merge.bias": [2 * h]})
    heads = {"attfc_y": (2 * h, h), "proj_scores": (1, 2 * h), "proj_reg": (4, 2 * h)} \
        if task == "vgd" else {"proj": (n_out, 2 * h)}
    for name, (out, inp) in heads.items():
        t.update({f"{name}.weight": [out, inp], f"{name}.bias": [out]})
    return {"module." + k: v for k, v in t.items()}


def fixed_layout(task: str, cfg, arch, n_out: int) -> dict:
    """A released file of ``arch`` at ``cfg``'s sizes."""
    layout = top_layout(task, cfg, n_out)
    for side in ("enc", "dec"):
        for i, op in enumerate(getattr(arch, side)):
            layout.update({f"module.{released_block(side, i)}.{r}": s
                           for r, s in op_layout(op, cfg.HSIZE, cfg.REL_SIZE).items()})
    return layout


def supernet_layout(task: str, cfg, n_out: int) -> dict:
    """``Net_Search`` of hygr_<task>.py: every block a MixedOp of the original's candidates,
    its ``alpha_prob`` and ``alpha_gate`` (12 encoder, 18 decoder blocks)."""
    layout = top_layout(task, cfg, n_out, search=True)
    for side, names, n in (("enc", ORIGINAL_ENC, 12), ("dec", ORIGINAL_DEC, 18)):
        for i in range(n):
            base = f"module.{released_block(side, i)}."
            for k, op in enumerate(names):
                layout.update({f"{base}candidate_ops.{k}.{r}": s
                               for r, s in op_layout(op, cfg.HSIZE, cfg.REL_SIZE).items()})
            layout[base + "alpha_prob"] = [len(names)]
            layout[base + "alpha_gate"] = [len(names)]
    return layout


@pytest.mark.parametrize("name", list(TASKS))
def test_layouts_written_here_are_the_released_ones(name):
    """The layouts the small tests write, checked against the released files."""
    n_out = {"vqa": ANSWERS, "vgd": 1, "itm": 1}[name]
    assert fixed_layout(name, make_task(name).cfg, paper_arch(name), n_out) == read_layout(name)


def test_released_file_of_another_architecture_names_the_block():
    task = make_task("vqa", HSIZE=64, FLAT_MLP_SIZE=64, REL_SIZE=16)
    task.ans_to_ix = {f"a{i}": i for i in range(7)}
    state = random_state(fixed_layout("vqa", task.cfg, paper_arch("vqa"), 7), 0)
    other = build_net(task.cfg, task, fixed_backbone(task.cfg, paper_arch("itm")))
    with pytest.raises(CheckpointError) as e:
        load_weights(other, state, "epoch13.pkl", task.original_key_prefixes)
    msg = str(e.value)
    # mmnas_vqa has self_att_64 at enc[2], mmnas_itm feed_forward; 14 blocks differ (SA and
    # GA hold the same tensors: that swap cannot be seen)
    assert msg == (
        "epoch13.pkl: does not fit this network: it holds another architecture (enc block 2 "
        "is 'self_att' or 'guided_att' in the checkpoint but 'feed_forward' in the network; "
        "enc block 3 is 'self_att' or 'guided_att' in the checkpoint but 'feed_forward' in the "
        "network; enc block 5 is 'feed_forward' in the checkpoint but 'self_att' or "
        "'guided_att' in the network; 11 more block(s) differ; pass the --ARCH_PATH and "
        "--ARCH_EPOCH it was trained with)")


def test_released_file_into_fewer_blocks_says_so():
    task = make_task("itm", HSIZE=64, FLAT_MLP_SIZE=64, REL_SIZE=16)
    arch = paper_arch("itm")
    state = random_state(fixed_layout("itm", task.cfg, arch, 1), 0)
    net = build_net(task.cfg, task, fixed_backbone(task.cfg, Arch(arch.enc, arch.dec[:17])))
    with pytest.raises(CheckpointError, match=r"it holds another architecture \(dec block 17 "
                       r"is 'rel_self_att' in the checkpoint but absent \(or "
                       r"'skip_connect'\) in the network; pass the --ARCH_PATH"):
        load_weights(net, state, "epoch13.pkl", task.original_key_prefixes)


@pytest.mark.parametrize("name", list(TASKS))
def test_original_search_checkpoint_warm_starts_our_search(name, tmp_path):
    # our candidates in another order than the original's: the mapping must go by name
    task = make_task(name, HSIZE=64, FLAT_MLP_SIZE=64, REL_SIZE=16,
                     ENC_CANDIDATES=list(reversed(ORIGINAL_ENC)),
                     DEC_CANDIDATES=list(reversed(ORIGINAL_DEC)))
    if name == "vqa":
        task.ans_to_ix = {f"a{i}": i for i in range(7)}
        task.ix_to_ans = list(task.ans_to_ix)
    n_out = {"vqa": 7, "vgd": 1, "itm": 1}[name]
    state = random_state(supernet_layout(name, task.cfg, n_out), seed=5)
    for key in state:
        if key.endswith("alpha_prob"):
            state[key] = torch.randn(state[key].shape)       # a different arg-max per block
    path = tmp_path / "search_epoch40.pkl"    # the original's search checkpoint, as it saves it
    torch.save({"state_dict": state, "net_optim": {}, "alpha_optim": {}}, path)
    net = build_net(task.cfg, task, search_backbone(task.cfg)).eval()
    lines = []
    warm_start(net, path, task, lines.append)
    words = "word vocabulary or answer vocabulary" if name == "vqa" else "word vocabulary"
    assert lines == [f"note: {path} records no {words} (a released or older checkpoint): "
                     f"rebuilt from the data the original's way, only sizes are checked",
                     f"warm start: supernet weights and architecture logits loaded from {path}"]

    # the arg-max architecture is the original's, read from its alpha_prob
    chosen = {}
    for side, names, blocks in (("enc", ORIGINAL_ENC, net.backbone.enc_list),
                                ("dec", ORIGINAL_DEC, net.backbone.dec_list)):
        chosen[side] = []
        for i, block in enumerate(blocks):
            alpha = state[f"module.{released_block(side, i)}.alpha_prob"]
            theirs = names[int(alpha.argmax())]
            assert block.names[int(block.alpha.argmax())] == theirs, (side, i)
            assert torch.equal(block.alpha.detach(), alpha[[names.index(n) for n in block.names]])
            chosen[side].append(theirs)
    # and the arg-max sub-network computes what the original's computes
    for m in mixed_ops(net):
        m.choose_argmax()

    def chosen_block(side, i):
        names = ORIGINAL_ENC if side == "enc" else ORIGINAL_DEC
        return f"{released_block(side, i)}.candidate_ops.{names.index(chosen[side][i])}"
    batch = sample_batch()
    with torch.no_grad():
        ours, theirs = net(batch), original_forward(name, state, chosen, chosen_block, batch, 64)
    if name == "vgd":
        assert torch.allclose(ours[0], theirs[0], atol=1e-5)
        assert torch.allclose(ours[1], theirs[1], atol=1e-5)
    elif name == "itm":
        assert torch.allclose(torch.sigmoid(ours), theirs, atol=1e-6)
    else:
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_search_space_other_than_the_original_is_named(tmp_path):
    task = make_task("vgd", HSIZE=64, FLAT_MLP_SIZE=64, REL_SIZE=16,
                     DEC_CANDIDATES=["self_att_64", "guided_att_64", "feed_forward"],
                     DEC_PRIOR=["guided_att_64", "feed_forward"])
    path = tmp_path / "search.pkl"
    torch.save({"state_dict": random_state(supernet_layout("vgd", task.cfg, 1), 0)}, path)
    net = build_net(task.cfg, task, search_backbone(task.cfg))
    with pytest.raises(CheckpointError) as e:
        warm_start(net, path, task, print)
    assert str(e.value) == (
        f"{path}: an original search checkpoint has the dec candidates ['self_att_64', "
        f"'rel_self_att_64', 'guided_att_64', 'feed_forward'], this supernet ['self_att_64', "
        f"'guided_att_64', 'feed_forward']; set DEC_CANDIDATES to the original's to load it")


def test_search_checkpoint_given_to_training_says_so():
    task = make_task("vgd", HSIZE=64, FLAT_MLP_SIZE=64, REL_SIZE=16)
    state = random_state(supernet_layout("vgd", task.cfg, 1), 0)
    net = build_net(task.cfg, task, fixed_backbone(task.cfg, paper_arch("vgd")))
    with pytest.raises(CheckpointError) as e:
        load_weights(net, state, "search.pkl", task.original_key_prefixes)
    assert str(e.value).startswith(
        "search.pkl: does not fit this network: it holds another architecture (enc block 0 is "
        "a search block of 2 candidates in the checkpoint but 'self_att' or 'guided_att' in "
        "the network;")
    assert str(e.value).endswith("27 more block(s) differ; a search checkpoint loads into a "
                                 "search (--CKPT_PATH of search_<task>.py), a trained one into "
                                 "training)")


def _show(tmp: Path) -> None:
    """``python3 tests/test_utils_checkpoint_released.py``: a released-layout file of each task, loaded."""
    for name in TASKS:
        task, arch = make_task(name), paper_arch(name)
        state = random_state(read_layout(name), seed=1)
        path = tmp / f"{name}_epoch13.pkl"
        torch.save({"state_dict": state, "net_optim": {}, "epoch": 13}, path)
        net = build_net(task.cfg, task, fixed_backbone(task.cfg, arch)).eval()
        load_weights(net, load_checkpoint(path)["state_dict"], str(path),
                     task.original_key_prefixes)
        batch = sample_batch()
        with torch.no_grad():
            ours = net(batch)
            theirs = original_forward(name, state, {"enc": arch.enc, "dec": arch.dec},
                                      released_block, batch, 512)
        ours = torch.sigmoid(ours) if name == "itm" else ours
        diff = max((a - b).abs().max().item() for a, b in
                   zip(ours if name == "vgd" else [ours], theirs if name == "vgd" else [theirs]))
        print(f"{name}: {len(state)} released tensors loaded into {len(net.state_dict())} "
              f"network tensors; largest output difference to the original's forward {diff:.1e}")


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        _show(Path(folder))
