"""Operators: shapes, masking, the original's LayerNorm, relation embeddings."""
import math

import pytest
import torch

from core.ops import OPS, Dropout, LayerNorm, MHAtt, OpSpec, build_op
from core.relations import image_relation, text_relation

SPEC = OpSpec(hsize=256, dropout_r=0.0, rel_size=8)   # every base (16..256) divides 256


def inputs(b=2, n=5, m=4):
    torch.manual_seed(0)
    x, y = torch.randn(b, n, 256), torch.randn(b, m, 256)
    x_mask = torch.zeros(b, 1, 1, n, dtype=torch.bool)
    x_mask[1, ..., -2:] = True
    y_mask = torch.zeros(b, 1, 1, m, dtype=torch.bool)
    y_mask[0, ..., -1] = True
    rel = torch.relu(torch.randn(b, n, n, 8))
    return x, x_mask, y, y_mask, rel


def test_layernorm_is_the_original_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 7) * 5 + 2
    ln = LayerNorm(7)
    with torch.no_grad():
        ln.a_2.uniform_()
        ln.b_2.uniform_()
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean) ** 2).sum(-1, keepdim=True).div(7 - 1).sqrt()   # unbiased
    expected = ln.a_2 * (x - mean) / (std + 1e-6) + ln.b_2            # eps outside the sqrt
    assert torch.allclose(ln(x), expected, atol=1e-6)
    # and it differs from torch's LayerNorm (biased variance, eps inside the sqrt)
    plain = torch.nn.functional.layer_norm(x, (7,), ln.a_2, ln.b_2, eps=1e-6)
    assert not torch.allclose(ln(x), plain, atol=1e-3)


def test_cpu_dropout_drops_at_rate_p_independently_and_rescales():
    """The fast CPU masks: four elements per 64-bit draw, yet each dropped with probability p
    on its own, kept ones scaled by 1/(1-p), gradients through the same mask."""
    drop = Dropout(0.1)
    x = torch.ones(1_000_000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert torch.allclose(y[kept], torch.tensor(1 / 0.9))
    # the four lanes of one draw are independent: neighbours both kept 0.81 of the time
    pairs = kept.view(-1, 4)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert abs((pairs[:, a] & pairs[:, b]).float().mean().item() - 0.81) < 0.003
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, torch.where(kept, 2 / 0.9, 0.0))
    # the global generator (seeded, saved in checkpoints) decides: same seed, same mask
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), y.detach())
    assert not torch.equal(drop(x.detach()), y.detach())
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_keeps_shape(name):
    op = build_op(name, SPEC).eval()
    x, x_mask, y, y_mask, rel = inputs()
    out = op(x, x_mask, y, y_mask, rel)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unknown_op_lists_valid_names():
    with pytest.raises(KeyError, match="self_att_64.*"):
        build_op("self_attention", SPEC)


def test_attention_heads_and_no_bias():
    att = MHAtt(OpSpec(512), base=64)
    assert att.heads == 8 and att.linear_q.bias is None and att.linear_merge.bias is None
    assert MHAtt(OpSpec(512), base=64, hsize_k=2).heads == 16


@pytest.mark.parametrize("name", ["self_att_16", "rel_self_att_16", "uniimg_att_16"])
def test_padded_keys_do_not_change_self_attention(name):
    """Whatever sits at masked positions, the unmasked outputs stay the same."""
    op = build_op(name, SPEC).eval()
    x, x_mask, y, y_mask, rel = inputs()
    out = op(x, x_mask, y, y_mask, rel)
    x2 = x.clone()
    x2[1, -2:] = 1000.0
    rel2 = rel.clone()
    rel2[1, :, -2:] = 7.0
    out2 = op(x2, x_mask, y, y_mask, rel2)
    assert torch.allclose(out[1, :-2], out2[1, :-2], atol=1e-5)


def test_padded_values_do_not_change_guided_attention():
    op = build_op("guided_att_64", SPEC).eval()
    x, x_mask, y, y_mask, rel = inputs()
    y2 = y.clone()
    y2[0, -1] = -500.0
    assert torch.allclose(op(x, x_mask, y, y_mask, rel)[0], op(x, x_mask, y2, y_mask, rel)[0],
                          atol=1e-5)


def test_relation_prior_is_added_to_the_logits():
    """RSA = softmax(qk/sqrt(d) + log(clamp(relu(W r + b), 1e-6)))."""
    torch.manual_seed(0)
    att = MHAtt(OpSpec(16, 0.0, 4), base=16, relation=True).eval()
    q = torch.randn(1, 3, 16)
    rel = torch.relu(torch.randn(1, 3, 3, 4))
    logits = (att.linear_q(q) @ att.linear_k(q).transpose(1, 2)) / 4.0
    prior = torch.relu(att.linear_r(rel)).clamp(min=1e-6).log()[..., 0]
    expected = att.linear_merge(torch.softmax(logits + prior, -1) @ att.linear_v(q))
    assert torch.allclose(att(q, q, None, rel), expected, atol=1e-5)


@pytest.mark.parametrize("hsize", [16, 32])            # one head (a matrix-vector product), two
def test_relation_prior_gradients_are_the_linear_layers(hsize):
    torch.manual_seed(0)
    att = MHAtt(OpSpec(hsize, 0.0, 4), base=16, relation=True)
    rel = torch.relu(torch.randn(2, 3, 3, 4)).requires_grad_()
    g = torch.randn(2, hsize // 16, 3, 3)
    (att.relation_prior(rel) * g).sum().backward()
    ours = [rel.grad.clone(), att.linear_r.weight.grad.clone(), att.linear_r.bias.grad.clone()]
    rel.grad = None
    att.zero_grad()
    plain = torch.relu(torch.nn.functional.linear(rel, att.linear_r.weight, att.linear_r.bias))
    (plain.clamp(min=1e-6).log().permute(0, 3, 1, 2) * g).sum().backward()
    for a, b in zip(ours, [rel.grad, att.linear_r.weight.grad, att.linear_r.bias.grad]):
        assert torch.allclose(a, b, atol=1e-6)


def test_image_relation_by_hand():
    # box 0: x 0..9 (w 10), y 0..19 (h 20), centre (5, 10); box 1: x 20..24 (w 5), y 0..19
    boxes = torch.tensor([[[0.0, 0.0, 9.0, 19.0], [20.0, 0.0, 24.0, 19.0], [0, 0, 0, 0]]])
    pad = torch.tensor([[False, False, True]])
    rel = image_relation(boxes, pad)
    cx1 = 20 + 2.5
    assert rel.shape == (1, 3, 3, 4)
    assert rel[0, 0, 1, 0].item() == pytest.approx(math.log(abs(5 - cx1) / 10))
    assert rel[0, 0, 1, 1].item() == pytest.approx(math.log(1e-3))        # same cy -> floor
    assert rel[0, 0, 1, 2].item() == pytest.approx(math.log(10 / 5))
    assert rel[0, 0, 1, 3].item() == pytest.approx(0.0)
    assert rel[0, 1, 0, 0].item() == pytest.approx(math.log(abs(cx1 - 5) / 5))
    assert (rel[0, 2] == 0).all() and (rel[0, :, 2] == 0).all()             # padding -> zero


def test_text_relation_cosine_and_padding():
    v = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    rel = text_relation(v, torch.tensor([[False, False, True]]))
    assert rel[0, 0, 1, 0].item() == pytest.approx(math.sqrt(5))
    assert rel[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-6)         # true cosine
    assert rel[0, 0, 0, 1].item() == pytest.approx(1.0)
    assert (rel[0, 2] == 0).all()


@pytest.mark.parametrize("relation", [False, True])
def test_fused_attention_equals_the_plain_formula(relation):
    torch.manual_seed(0)
    att = MHAtt(OpSpec(64, 0.1, 8), base=16, relation=relation).eval()
    x, y = torch.randn(3, 7, 64), torch.randn(3, 5, 64)
    mask = torch.zeros(3, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., -2:] = True
    mask[2, ..., 1:] = True                                  # a single visible key
    rel = torch.relu(torch.randn(3, 7, 5, 8))
    fused = att.fused(x, y, mask, rel if relation else None)
    plain = att.reference(x, y, mask, rel if relation else None)
    assert torch.allclose(fused, plain, atol=1e-5)
