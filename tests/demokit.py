"""Checks shared by the demo-generator tests."""
from pathlib import Path

import numpy as np


def assert_same_files(a: Path, b: Path, differ: tuple[str, ...] = ()) -> None:
    """The two folders hold the same files with the same contents (``.npz`` arrays equal);
    the files ``differ`` (relative paths) only need to exist in both."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in names:
        if str(rel) in differ:
            continue
        if rel.suffix == ".npz":
            with np.load(a / rel) as fa, np.load(b / rel) as fb:
                assert all(np.array_equal(fa[k], fb[k]) for k in fa.files), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
