"""The search mechanics: binary-gate gradients, sampled weight steps, supernet -> fixed net."""

import pytest
import torch
import torch.nn.functional as F

from core.arch import Arch
from core.loop import weight_step
from core.mixed import Architect, MixedOp, mixed_ops, weight_parameters
from core.model import current_arch
from netkit import batch, fixed_net, small_cfg, supernet


class _Loss:
    """Stands in for the task: BCE-with-logits, reduction sum (the VQA loss)."""
    loss = staticmethod(lambda out, b: F.binary_cross_entropy_with_logits(
        out, b["target"], reduction="sum"))


def test_prior_initialises_alpha():
    net = supernet(small_cfg())
    enc, dec = net.backbone.enc_list, net.backbone.dec_list
    assert enc[0].alpha.tolist() == [1.0, -1.0] and enc[1].alpha.tolist() == [-1.0, 1.0]
    # decoder prior RSA, GA, FFN repeating over candidates (SA, RSA, GA, FFN)
    assert dec[0].alpha.tolist() == [-1.0, 1.0, -1.0, -1.0]
    assert dec[3].alpha.tolist() == [-1.0, 1.0, -1.0, -1.0]
    assert current_arch(net.backbone).dec[:3] == ("rel_self_att_16", "guided_att_16",
                                                  "feed_forward")


@pytest.mark.parametrize("logit, drawn", [(1.0, 0.711), (2.0, 0.948)])
def test_prior_logit_sets_how_often_weight_steps_draw_the_prior(logit, drawn):
    """PRIOR_LOGIT=v: +v for the prior's op, -v for the others; the share of weight steps
    that run the prior's op in a 4-candidate decoder block is e^v / (e^v + 3 e^-v)."""
    net = supernet(small_cfg(PRIOR_LOGIT=logit))
    block = net.backbone.dec_list[0]
    assert block.alpha.tolist() == [-logit, logit, -logit, -logit]
    gen = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(4000):
        block.sample(gen)
        runs.append(block.active)
    assert runs.count(1) / len(runs) == pytest.approx(drawn, abs=0.02)
    assert net.backbone.enc_list[1].alpha.tolist() == [-logit, logit]


def _gate_grads(net, b, gen, mode="full"):
    for m in mixed_ops(net):
        m.binarize(mode, gen)
    loss = _Loss.loss(net(b), b)
    return torch.autograd.grad(loss, [m.gates for m in mixed_ops(net)])


def test_gate_gradient_matches_finite_differences():
    cfg = small_cfg()
    net = supernet(cfg).double().eval()
    b = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in batch(cfg).items()}
    gen = torch.Generator().manual_seed(3)
    grads = _gate_grads(net, b, gen)
    mixed = mixed_ops(net)
    eps = 1e-6
    for k in (0, 3, 5):                       # an encoder and two decoder blocks
        m = mixed[k]
        for j in range(len(m.names)):
            with torch.no_grad():
                base = _Loss.loss(net(b), b).item()
                m.gates[j] += eps
                bumped = _Loss.loss(net(b), b).item()
                m.gates[j] -= eps
            assert grads[k][j].item() == pytest.approx((bumped - base) / eps, rel=1e-4, abs=1e-6)
    # inactive candidates have a non-zero gradient although they ran without autograd
    assert any(abs(g[i]) > 0 for g, m in zip(grads, mixed) for i in range(len(m.names))
               if i != m.active)


def test_gate_gradient_equals_full_autograd_reference():
    """Inactive candidates computed without autograd give the same dL/dg as with it."""
    cfg = small_cfg()
    net = supernet(cfg).eval()
    b = batch(cfg)
    grads = _gate_grads(net, b, torch.Generator().manual_seed(5))
    # reference: every candidate with autograd, out = sum_i g_i op_i(x)
    gates = [m.gates.detach().clone().requires_grad_(True) for m in mixed_ops(net)]
    originals = []
    for m, g in zip(mixed_ops(net), gates):
        def forward(*args, m=m, g=g):
            return sum(g[i] * m.candidate_ops[i](*args) for i in range(len(m.names)))
        originals.append(m.forward)
        m.forward = forward
    ref = torch.autograd.grad(_Loss.loss(net(b), b), gates)
    for m, f in zip(mixed_ops(net), originals):
        m.forward = f
    for a, r in zip(grads, ref):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-4)


def test_alpha_gradient_is_the_softmax_chain_rule():
    m = MixedOp(["self_att_16", "feed_forward", "guided_att_16"],
                __import__("core.ops", fromlist=["OpSpec"]).OpSpec(32, 0.0, 8))
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.3, -0.2, 1.1]))
    m.involved = [0, 1, 2]
    g = torch.tensor([0.5, -1.5, 2.0])
    m.set_alpha_grad(g)
    alpha = m.alpha.detach().clone().requires_grad_(True)
    (torch.softmax(alpha, -1) * g).sum().backward()     # sum_j dL/dg_j * dp_j/dalpha_i
    assert torch.allclose(m.alpha.grad, alpha.grad, atol=1e-6)


def test_two_mode_keeps_the_other_probabilities():
    cfg = small_cfg()
    net = supernet(cfg)
    b = batch(cfg)
    dec = net.backbone.dec_list[0]
    with torch.no_grad():
        dec.alpha.copy_(torch.tensor([0.1, 0.4, -0.3, 0.2]))
    before = dec.probs()
    architect = Architect(net, lr=0.1, betas=(0.0, 0.999), mode="two")
    gen = torch.Generator().manual_seed(0)
    architect.step(lambda: _Loss.loss(net(b), b), gen)
    after = dec.probs()
    changed = [i for i in range(4) if abs(after[i] - before[i]) > 1e-7]
    untouched = [i for i in range(4) if i not in changed]
    assert len(changed) == 2 and len(untouched) == 2
    assert torch.allclose(after[untouched], before[untouched], atol=1e-6)


def test_architecture_step_moves_alphas_only():
    cfg = small_cfg()
    net = supernet(cfg)
    b = batch(cfg)
    weights = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("alpha")}
    alphas = [m.alpha.detach().clone() for m in mixed_ops(net)]
    Architect(net, 0.1, (0.0, 0.999), "full").step(lambda: _Loss.loss(net(b), b),
                                                   torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, m.alpha) for a, m in zip(alphas, mixed_ops(net)))
    for k, v in net.state_dict().items():
        if not k.endswith("alpha"):
            assert torch.equal(v, weights[k]), k
    assert all(m.gates is None for m in mixed_ops(net))


def test_weight_step_changes_only_the_sampled_path():
    """The original's defect: Adam kept moving switched-off candidates. Ours must not."""
    cfg = small_cfg()
    net = supernet(cfg)
    b = batch(cfg)
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):   # later steps have Adam moments for paths sampled earlier
        for m in mixed_ops(net):
            m.sample(gen)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        weight_step(net, _Loss, b, optim, params, cfg, torch.device("cpu"))
        after = net.state_dict()
        for block in mixed_ops(net):
            for i, op in enumerate(block.candidate_ops):
                changed = any(not torch.equal(p, before_p) for p, before_p in
                              zip(op.state_dict().values(), _sub(before, block, i, net)))
                if i != block.active:
                    assert not changed, f"inactive candidate {block.names[i]} moved"
        assert not torch.equal(after["img_feat_linear.weight"], before["img_feat_linear.weight"])
    assert all(p.requires_grad for p in params)


def _sub(state, block, i, net):
    prefix = next(n for n, mod in net.named_modules() if mod is block.candidate_ops[i]) + "."
    return [v for k, v in state.items() if k.startswith(prefix)]


def test_relation_embedding_only_when_used():
    cfg = small_cfg()
    no_rsa = Arch(("self_att_16", "feed_forward"), ("guided_att_16",) * 4)
    net = fixed_net(cfg, no_rsa)
    assert net.backbone.linear_rel_img is None and net.backbone.linear_rel_txt is None
    with_rsa = Arch(("rel_self_att_16", "feed_forward"), ("rel_self_att_16",) * 4)
    net = fixed_net(cfg, with_rsa)
    assert net.backbone.linear_rel_img is not None and net.backbone.linear_rel_txt is not None
    assert net(batch(cfg)).shape == (3, 7)
