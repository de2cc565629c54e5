"""Our tensor names -> the names the original's released checkpoints use (the inverse of
utils/checkpoint.py's mapping, written out here so that tests do not check it by itself).
The true layout is tests/data/released_layout/<task>.txt (test_utils_checkpoint_released.py checks it)."""
import re

# full_vqa.py / full_itm.py and full_vgd.py: x is the text, y the image regions
HEADS = {"vqa": {"head.attflat_lang.": "attflat_x.", "head.attflat_img.": "attflat_y.",
                 "head.proj_norm.": "proj_norm.", "head.proj.": "proj."},
         "vgd": {"head.attflat_lang.": "attflat_x.", "head.linear_img.": "attfc_y.",
                 "head.proj_norm.": "proj_norm.", "head.linear_score.": "proj_scores.",
                 "head.linear_reg.": "proj_reg."}}
HEADS["itm"] = HEADS["vqa"]
TOP = {"img_feat_linear.": "imgfeat_linear.", "backbone.linear_rel_img.": "linear_y_rel.",
       "backbone.linear_rel_txt.": "linear_x_rel."}


def released_names(state: dict, task: str = "vqa") -> dict:
    """A fixed network's state dict under the original's names, as DDP saved it."""
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"backbone\.(enc|dec)_list\.(\d+)\.(.+)", key)
        if block:
            side, i, rest = block.groups()
            rest = "ln." + rest[len("norm."):] if rest.startswith("norm.") else rest
            key = f"backnone.cells_{side}.0.dag.{i}.0.{rest}"
        else:
            for ours, theirs in {**TOP, **HEADS[task]}.items():
                if key.startswith(ours):
                    key = theirs + key[len(ours):]
                    break
        out["module." + key] = value
    return out
