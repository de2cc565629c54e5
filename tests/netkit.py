"""Small networks and batches for tests (hidden size 32, few blocks, no dropout)."""
import numpy as np
import torch

from core.config import resolve
from core.model import Net, PooledFusionHead, fixed_backbone, search_backbone

VOCAB, ANSWERS = 30, 7


def small_cfg(**over):
    values = {"HSIZE": 32, "FLAT_MLP_SIZE": 32, "REL_SIZE": 8, "DROPOUT_R": 0.0,
              "WORD_EMBED_SIZE": 16, "IMG_FEAT_SIZE": 24, "ENC_BLOCKS": 2, "DEC_BLOCKS": 4}
    values.update(over)
    # base 64 does not divide H = 32: use base-16 attention in small tests
    values.setdefault("ENC_CANDIDATES", ["self_att_16", "feed_forward"])
    values.setdefault("DEC_CANDIDATES", ["self_att_16", "rel_self_att_16", "guided_att_16",
                                         "feed_forward"])
    values.setdefault("ENC_PRIOR", ["self_att_16", "feed_forward"])
    values.setdefault("DEC_PRIOR", ["rel_self_att_16", "guided_att_16", "feed_forward"])
    return resolve("vqa", "train", values)


def net_for(cfg, backbone, seed=0):
    torch.manual_seed(seed)
    return Net(VOCAB, None, cfg, backbone, PooledFusionHead(cfg, ANSWERS))


def supernet(cfg, seed=0):
    return net_for(cfg, search_backbone(cfg), seed)


def fixed_net(cfg, arch, seed=0):
    return net_for(cfg, fixed_backbone(cfg, arch), seed)


def batch(cfg, b=3, t=6, n=5, seed=1):
    """Token ids with padding, regions with one all-zero (padded) row per sample but one."""
    g = np.random.default_rng(seed)
    txt = torch.from_numpy(g.integers(3, VOCAB, (b, t)))
    txt[1:, -2:] = 0
    img = torch.from_numpy(np.abs(g.standard_normal((b, n, cfg.IMG_FEAT_SIZE))).astype(np.float32))
    img[1:, -1] = 0
    xy = g.uniform(0, 300, (b, n, 2))
    wh = g.uniform(20, 200, (b, n, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + wh], -1).astype(np.float32))
    boxes[1:, -1] = 0
    target = torch.zeros(b, ANSWERS)
    target[torch.arange(b), torch.arange(b) % ANSWERS] = 1.0
    return {"txt": txt, "img": img, "boxes": boxes, "target": target, "qid": list(range(b))}
