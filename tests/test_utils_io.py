"""File writes (utils/io.py): atomic (a crash keeps the old file), with the user's umask."""
import os

import pytest
import torch

from utils.checkpoint import save_checkpoint
from utils.io import atomic_write, atomic_write_text


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "epoch1.pkl"
    path.write_text("old")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch1.pkl"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        save_checkpoint(tmp_path / "epoch1.pkl", {"state_dict": {"w": torch.ones(2)}})
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == mode
    assert (tmp_path / "epoch1.pkl").stat().st_mode & 0o777 == mode
