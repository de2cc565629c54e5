"""--COMPILE=on: compiled networks compute what eager ones do; the search's recompiles stay
bounded; without a C++ compiler the run stays eager and says so.

Compiled here with the 'aot_eager' backend (the same dynamo capture and forward/backward
graphs as inductor, without its C++ builds: minutes for even a tiny network on this CPU), and
the search's graphs counted with dynamo's alone ('eager')."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from core.arch import Arch
from core.compile import compile_counters, compile_net
from core.mixed import Architect, mixed_ops
from netkit import batch, fixed_net, small_cfg, supernet

ARCH = Arch(("self_att_16", "feed_forward"),
            ("rel_self_att_16", "guided_att_16", "feed_forward", "guided_att_16"))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def loss_and_grads(net, b):
    net.zero_grad()
    out = net(b)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, b["target"])
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()
                           if p.grad is not None}


def test_compiled_network_trains_and_evaluates_as_eager():
    cfg = small_cfg(COMPILE="on")
    eager = fixed_net(cfg, ARCH).train()
    net = copy.deepcopy(eager)
    lines = []
    assert compile_net(net, cfg, CPU, lines.append, backend="aot_eager") is net
    assert lines == ["COMPILE=on: the network's forward compiled (aot_eager)"]
    assert net.state_dict().keys() == eager.state_dict().keys()      # checkpoints unchanged
    b = batch(cfg)
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(net, b), loss_and_grads(eager, b)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6), k
    with torch.no_grad():
        assert torch.allclose(net.eval()(b), eager.eval()(b), rtol=1e-5, atol=1e-6)
    assert compile_counters()["graphs"] >= 1


def test_search_compiles_each_candidate_and_its_graphs_stop_growing():
    cfg = small_cfg(COMPILE="on", ENC_BLOCKS=1, DEC_BLOCKS=3, DEC_PRIOR=["guided_att_16"],
                    DEC_CANDIDATES=["guided_att_16", "feed_forward"])
    eager = supernet(cfg).train()
    net = copy.deepcopy(eager)
    lines = []
    compile_net(net, cfg, CPU, lines.append, backend="eager")      # dynamo's graphs only
    assert lines == ["COMPILE=on: every candidate operator of the 4 searchable blocks "
                     "compiled on its own (eager)"]
    b = batch(cfg)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    architects = [Architect(n, 0.1, (0.0, 0.999), "full") for n in (net, eager)]

    def steps(count):
        for _ in range(count):
            for n, gen in zip((net, eager), gens):
                for m in mixed_ops(n):
                    m.sample(gen)
            (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(net, b), loss_and_grads(eager, b)
            assert torch.allclose(loss_a, loss_b, rtol=1e-5)
            for k in grads_b:
                assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6), k
            for architect, n, gen in zip(architects, (net, eager), gens):
                architect.step(lambda n=n: torch.nn.functional.binary_cross_entropy_with_logits(
                    n(b), b["target"]), gen)
            for a, e in zip(mixed_ops(net), mixed_ops(eager)):
                assert torch.allclose(a.alpha, e.alpha, atol=1e-6)

    steps(3)              # weight steps and architecture steps ('full': every candidate)
    graphs = compile_counters()["graphs"]
    # the candidate kinds (attention, guided attention, feed forward on text and on regions),
    # with and without autograd: graphs per kind, not per block or per path
    assert 3 <= graphs <= 8 * 3
    steps(3)                                  # other paths, the same graphs
    assert compile_counters()["graphs"] == graphs


def test_without_a_cpp_compiler_the_run_stays_eager_and_says_why(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("core.compile.shutil.which", lambda name: None)
    cfg = small_cfg(COMPILE="on")
    net = fixed_net(cfg, ARCH)
    lines = []
    compile_net(net, cfg, CPU, lines.append)
    assert lines == ["COMPILE=on: no C++ compiler found (g++ or clang++ or c++ on PATH; "
                     "inductor needs one on CPUs: install g++ or set CXX); running eager"]
    assert net._compiled_call_impl is None
    net(batch(cfg))
    assert compile_counters()["frames"] == 0


def test_compile_off_leaves_the_network_alone():
    cfg = small_cfg()
    assert cfg.COMPILE == "off"
    net = fixed_net(cfg, ARCH)
    lines = []
    compile_net(net, cfg, CPU, lines.append)
    assert lines == [] and net._compiled_call_impl is None
