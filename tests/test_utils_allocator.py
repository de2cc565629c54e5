"""utils/allocator.py: with glibc, a CPU step's freed activations are reused, not mapped
afresh (the page faults were a quarter of a CPU step)."""
import platform
import subprocess
import sys

import pytest

from tests.runkit import REPO

FAULTS = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from utils.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(9216, 256)                # a step whose activations are 36 MiB, above
w = torch.randn(256, 1024, requires_grad=True)   # glibc's largest (dynamic) mmap threshold
def step():
    (x @ w).relu().square().sum().backward()
for _ in range(5):                        # the heap grows to its steady size
    step()
start = faults()
for _ in range(5):
    step()
print(faults() - start)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS.format(repo=str(REPO)), mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_activations_are_reused_without_page_faults():
    system, kept = page_faults("system"), page_faults("keep")
    assert system > 5 * 9216             # at least one 36 MiB activation mapped afresh a step
    assert kept < system / 5             # measured: ~320,000 vs 0-37,000 (the heap still
                                         # grows now and then: alignment leaves holes)


def test_the_allocator_setting_says_what_it_did():
    from utils.allocator import keep_freed_memory
    said = keep_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert said.startswith("glibc malloc keeps freed memory")
    else:
        assert said.startswith("system allocator")
