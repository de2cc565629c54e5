"""Architecture files (core/arch.py): the shipped ones load; a bad one is named with its field."""
import json
from pathlib import Path

import pytest

from core.arch import Arch, ArchError, load_arch, save_arch

REPO = Path(__file__).resolve().parents[1]


def _arch_file(tmp_path, entry, key="epoch0"):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({key: entry}))
    return path


def _mcan_entry():
    return json.loads((REPO / "arch" / "mcan.json").read_text())["epoch0"]


def test_shipped_mcan_architecture():
    arch = load_arch(REPO / "arch" / "mcan.json", 0, 12, 18)
    assert arch.enc == ("self_att_64", "feed_forward") * 6
    assert arch.dec == ("self_att_64", "guided_att_64", "feed_forward") * 6


def test_arch_unknown_op_lists_valid_names(tmp_path):
    entry = _mcan_entry()
    entry["dec"][4] = ["guided_att_65"]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError) as e:
        load_arch(path, 0, 12, 18)
    msg = str(e.value)
    assert msg.startswith(f"{path} [epoch0]: dec[4] has unknown op 'guided_att_65'")
    for name in ("self_att_64", "guided_att_64", "rel_self_att_64", "feed_forward"):
        assert name in msg


def test_arch_missing_epoch_lists_keys_present(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"epoch10": _mcan_entry(), "epoch2": _mcan_entry()}))
    with pytest.raises(ArchError) as e:
        load_arch(path, 5, 12, 18)
    assert str(e.value) == (f"{path}: no key 'epoch5' (from --ARCH_EPOCH=5); keys present: "
                            f"epoch2, epoch10")
    path.write_text("{}")
    with pytest.raises(ArchError, match="keys present: none"):
        load_arch(path, 0, 12, 18)


@pytest.mark.parametrize("side, n, expected", [("enc", 11, 12), ("dec", 17, 18),
                                               ("dec", 19, 18)])
def test_arch_wrong_block_count(tmp_path, side, n, expected):
    entry = _mcan_entry()
    entry[side] = (entry[side] * 2)[:n]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError) as e:
        load_arch(path, 0, 12, 18)
    assert str(e.value) == (f"{path} [epoch0]: field '{side}' has {n} blocks, expected "
                            f"{expected} ({side.upper()}_BLOCKS)")


def test_arch_file_missing_or_not_json_or_bad_block(tmp_path):
    with pytest.raises(ArchError, match="architecture file .*nope.json does not exist"):
        load_arch(tmp_path / "nope.json", 0, 12, 18)
    path = tmp_path / "arch.json"
    path.write_text("{epoch0:")
    with pytest.raises(ArchError, match=r"arch.json: not valid JSON"):
        load_arch(path, 0, 12, 18)
    entry = _mcan_entry()
    entry["enc"][0] = ["self_att_64", "feed_forward"]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError, match=r"enc\[0\] = \['self_att_64', 'feed_forward'\], "
                                        r"expected \[\"op name\"\]"):
        load_arch(path, 0, 12, 18)
    path = _arch_file(tmp_path, {"enc": _mcan_entry()["enc"]})
    with pytest.raises(ArchError, match="field 'dec' is missing or not a list"):
        load_arch(path, 0, 12, 18)


def test_arch_json_round_trip(tmp_path):
    arch = Arch(("self_att_64",) * 12, ("guided_att_64", "rel_self_att_64", "feed_forward") * 6)
    path = tmp_path / "arch.json"
    save_arch(path, 3, arch)
    save_arch(path, 10, arch)
    save_arch(path, 2, Arch(("feed_forward",) * 12, ("self_att_64",) * 18))
    data = json.loads(path.read_text())
    assert list(data) == ["epoch2", "epoch3", "epoch10"]
    assert data["epoch3"]["enc"][0] == ["self_att_64"]
    assert load_arch(path, 3, 12, 18) == arch


@pytest.mark.parametrize("name", ["mcan", "mmnas_vqa", "mmnas_vgd", "mmnas_itm"])
def test_shipped_architectures(name):
    arch = load_arch(f"arch/{name}.json", 0, 12, 18)
    abbrev = {"self_att_64": "SA", "guided_att_64": "GA", "rel_self_att_64": "RSA",
              "feed_forward": "FFN"}
    expected = {
        "mcan": ("SA FFN " * 6, "SA GA FFN " * 6),
        "mmnas_vqa": ("SA SA SA SA FFN FFN FFN FFN SA FFN FFN FFN",
                      "GA GA FFN FFN GA FFN RSA GA FFN GA RSA FFN RSA SA FFN RSA GA FFN"),
        "mmnas_vgd": ("SA FFN FFN SA FFN FFN FFN FFN FFN FFN FFN SA",
                      "GA GA GA GA GA GA FFN GA RSA RSA GA FFN RSA GA GA RSA GA RSA"),
        "mmnas_itm": ("SA SA FFN FFN FFN SA FFN SA FFN FFN FFN FFN",
                      "SA GA GA RSA SA GA RSA GA GA GA GA FFN GA GA RSA SA GA RSA"),
    }[name]
    assert " ".join(abbrev[o] for o in arch.enc) == expected[0].strip()
    assert " ".join(abbrev[o] for o in arch.dec) == expected[1].strip()


def test_non_utf8_architecture_file_names_the_file(tmp_path):
    from core.arch import load_arch
    arch = tmp_path / "arch.json"
    arch.write_bytes(b'{"epoch0": {"enc": [["self_att_64"]], "dec": [["guided\xe9"]]}}')
    with pytest.raises(ValueError, match=rf"{arch}.*byte 0xe9 at byte offset 54 \(line 1\)"):
        load_arch(arch, 0, 1, 1)
