"""Pictures of a run, task-free: architecture weights, architectures, curves, attention.

Every function writes one PNG of an exact pixel size (``size=(width, height)``; a default
that fits the content otherwise) with matplotlib's Agg backend (no display needed) and
returns what it drew (the numbers, colours, texts), so that a test can check the picture's
content, not only that a file exists.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
# Fixed colours for the paper's operators; any other operator gets a stable colour from
# its name, so that one operator has one colour in every picture.
OP_COLOURS = {"self_att_64": "#4c72b0", "guided_att_64": "#dd8452", "rel_self_att_64": "#55a868",
              "feed_forward": "#c44e52", "skip_connect": "#bbbbbb", "none": "#ffffff"}
# Short operator names: the one table for pictures, logs and the study tables.
SHORT = {"self_att_64": "SA", "guided_att_64": "GA", "rel_self_att_64": "RSA",
         "feed_forward": "FFN"}
# Operators that read the other modality (the decoder's read the encoded text).
READS_OTHER = ("guided_att", "uniimg_att")


def op_colour(op: str) -> str:
    if op in OP_COLOURS:
        return OP_COLOURS[op]
    r, g, b, _ = plt.get_cmap("tab20")(zlib.crc32(op.encode()) % 20)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def short(op: str) -> str:
    return SHORT.get(op, op)


def reads_other(op: str) -> bool:
    return op.startswith(READS_OTHER)


def _figure(size):
    w, h = size
    return plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)


def _save(fig, path) -> None:
    """Exactly the figure's size (no tight bounding box, which would change it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    tmp.replace(path)       # a killed run never leaves half a picture under the real name


# --- architecture weights ----------------------------------------------------------------
def alpha_heatmap(path, sides: dict, title: str = "", size=None) -> dict:
    """Heatmap of softmax(alpha) per side: ``sides`` maps "enc"/"dec" to (operator names,
    probabilities [blocks, operators]); rows blocks, columns operators. Returns
    {side: the drawn [blocks, operators] array}."""
    drawn = {s: np.asarray(p, dtype=float) for s, (_, p) in sides.items()}
    rows = max(len(p) for p in drawn.values())
    size = size or (360 * len(sides) + 80, 28 * rows + 160)
    fig = _figure(size)
    for k, (side, (names, _)) in enumerate(sides.items()):
        probs = drawn[side]
        ax = fig.add_subplot(1, len(sides), k + 1)
        ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(names)), [short(n) for n in names], rotation=45, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(probs)), [f"{side} {i:02d}" for i in range(len(probs))],
                      fontsize=7)
        for (i, j), p in np.ndenumerate(probs):
            ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if p > 0.6 else "white")
    fig.suptitle(title or "softmax(alpha) per block")
    fig.tight_layout()
    _save(fig, path)
    return drawn


def alpha_trajectories(path, epochs: list[int], sides: dict, size=None, cols: int = 6) -> dict:
    """Each block's probabilities over the epochs, one small panel per block: ``sides``
    maps "enc"/"dec" to (operator names, probabilities [epochs, blocks, operators]).
    Returns {side: the drawn [epochs, blocks, operators] array}."""
    drawn = {s: np.asarray(p, dtype=float) for s, (_, p) in sides.items()}
    panels = [(side, b) for side, p in drawn.items() for b in range(p.shape[1])]
    rows = -(-len(panels) // cols)
    size = size or (190 * cols, 150 * rows + 90)
    fig = _figure(size)
    for k, (side, b) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for j, name in enumerate(sides[side][0]):
            ax.plot(epochs, drawn[side][:, b, j], color=op_colour(name), label=short(name),
                    marker="." if len(epochs) < 10 else None)
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{side} {b:02d}", fontsize=8)
        ax.tick_params(labelsize=6)
    handles = [patches.Patch(color=op_colour(n), label=short(n))
               for n in dict.fromkeys(n for names, _ in sides.values() for n in names)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 40 / size[1]))
    _save(fig, path)
    return drawn


# --- architectures -----------------------------------------------------------------------
def arch_diagram(path, arch: dict, title: str = "", size=None) -> dict:
    """Encoder (text) and decoder (image) stacks, one box per block coloured by its
    operator, bottom to top; a line from the encoder's output to every decoder block that
    reads it (guided attention). ``arch`` is one entry of an architecture JSON
    (``{"enc": [["op"], ...], "dec": [...]}``). Returns {"enc": [(op, colour)], "dec":
    [...], "guided": [decoder blocks reading the encoder], "enc_reads_image": [...]}."""
    stacks = {side: [b[0] if isinstance(b, list) else b for b in arch[side]]
              for side in ("enc", "dec")}
    n = max(len(s) for s in stacks.values())
    size = size or (520, 26 * n + 150)
    fig = _figure(size)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.2, n + 0.5)
    ax.axis("off")
    x0 = {"enc": 0.6, "dec": 5.8}
    width, drawn = 3.6, {}
    for side, ops in stacks.items():
        drawn[side] = []
        for i, op in enumerate(ops):
            colour = op_colour(op)
            ax.add_patch(patches.FancyBboxPatch((x0[side], i + 0.1), width, 0.8,
                                                boxstyle="round,pad=0.02", fc=colour,
                                                ec="black", lw=0.6))
            ax.text(x0[side] + width / 2, i + 0.5, f"{i:02d} {short(op)}", ha="center",
                    va="center", fontsize=7)
            drawn[side].append((op, colour))
        label = "encoder (text)" if side == "enc" else "decoder (image regions)"
        ax.text(x0[side] + width / 2, -0.6, label, ha="center", va="center", fontsize=9)
    drawn["guided"] = [i for i, op in enumerate(stacks["dec"]) if reads_other(op)]
    drawn["enc_reads_image"] = [i for i, op in enumerate(stacks["enc"]) if reads_other(op)]
    top = len(stacks["enc"]) - 0.1        # the encoded text leaves the encoder's top
    for i in drawn["guided"]:
        ax.annotate("", xy=(x0["dec"], i + 0.5), xytext=(x0["enc"] + width, top),
                    arrowprops=dict(arrowstyle="->", lw=0.6, color=OP_COLOURS["guided_att_64"],
                                    alpha=0.8))
    ax.set_title(title or "architecture", fontsize=10)
    _save(fig, path)
    return drawn


# --- curves ------------------------------------------------------------------------------
def curves(path, records: list[dict], title: str = "", size=(900, 360)) -> dict:
    """Loss (left) and metrics (right) per epoch: ``records`` are
    ``{"epoch": n, "loss": x, "<metric>": y, ...}``. Returns {series: [(epoch, value)]}."""
    series: dict[str, list] = {}
    for r in records:
        for key, value in r.items():
            if key != "epoch" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((r["epoch"], float(value)))
    fig = _figure(size)
    for k, (keys, label) in enumerate(((["loss"], "loss"),
                                       ([s for s in series if s != "loss"], "metric"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for key in keys:
            if key in series:
                xs, ys = zip(*series[key])
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if any(key in series for key in keys):
            ax.legend(fontsize=7)
    fig.suptitle(title or "per epoch")
    fig.tight_layout()
    _save(fig, path)
    return series


# --- attention ---------------------------------------------------------------------------
def region_heat(image_hw, boxes, weights, cells: int = 64) -> np.ndarray:
    """Each region's weight spread over its box, summed: [cells_h, cells_w], max 1 (or 0)."""
    h, w = image_hw
    ch, cw = max(1, round(cells * h / max(h, w))), max(1, round(cells * w / max(h, w)))
    heat = np.zeros((ch, cw))
    for (x1, y1, x2, y2), a in zip(np.asarray(boxes, float), np.asarray(weights, float)):
        c1, c2 = int(np.floor(x1 / w * cw)), int(np.ceil(x2 / w * cw))
        r1, r2 = int(np.floor(y1 / h * ch)), int(np.ceil(y2 / h * ch))
        heat[max(r1, 0):max(r2, r1 + 1), max(c1, 0):max(c2, c1 + 1)] += a
    return heat / heat.max() if heat.max() > 0 else heat


def attention_map(path, image_hw, boxes, region_weights, words, word_weights, lines,
                  image=None, marked: dict | None = None, top: int = 3, size=(900, 700),
                  weighted_by: str = "the image attention") -> dict:
    """Regions weighted by the image attention (a heat over the image, or over a blank
    canvas of its size) with the ``top`` regions outlined, ``marked`` boxes (name -> (box
    xyxy, colour): e.g. predicted and true) drawn on top, the words coloured by the text
    attention, and ``lines`` (the answer, the score) beside. Returns what was drawn."""
    h, w = image_hw
    region_weights = np.asarray(region_weights, float)
    word_weights = np.asarray(word_weights, float)
    fig = _figure(size)
    ax = fig.add_axes((0.08, 0.25, 0.57, 0.7))
    # the background is an image either way, so that the heat (an image too) lies above it
    ax.imshow(image if image is not None else np.full((2, 2, 3), 0.95), extent=(0, w, h, 0))
    heat = region_heat(image_hw, boxes, region_weights)
    shade = np.zeros(heat.shape + (4,))
    shade[..., 3] = 0.7 * (1.0 - heat)          # attended regions bright, the rest darkened
    ax.imshow(shade, extent=(0, w, h, 0), interpolation="bilinear")
    order = [int(i) for i in np.argsort(-region_weights)[:top]]
    for rank, i in enumerate(order):
        x1, y1, x2, y2 = np.asarray(boxes, float)[i]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white",
                                       lw=1.5, ls="--"))
        ax.text(x1 + 2, y1 + 2, f"{rank + 1}: {region_weights[i]:.2f}", color="white",
                fontsize=7, va="top", bbox=dict(fc="black", alpha=0.5, lw=0))
    for name, (box, colour) in (marked or {}).items():
        x1, y1, x2, y2 = box
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=2.5))
        ax.text(x1, y2, name, color="white", fontsize=8, va="top",
                bbox=dict(fc=colour, alpha=0.8, lw=0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(f"regions weighted by {weighted_by}"
                 + ("" if image is not None else " (no image file: blank canvas)"), fontsize=9)
    side = fig.add_axes((0.68, 0.25, 0.3, 0.7))
    side.axis("off")
    side.text(0, 1, "\n".join(lines), va="top", fontsize=9, family="monospace")
    words_ax = fig.add_axes((0.03, 0.02, 0.94, 0.16))
    words_ax.axis("off")
    words_ax.set_title("words weighted by the text attention", fontsize=9)
    peak = word_weights.max() if len(word_weights) and word_weights.max() > 0 else 1.0
    cmap, x, y = plt.get_cmap("Reds"), 0.0, 0.7
    for word, a in zip(words, word_weights):
        step = 9 * (len(word) + 6) / (0.94 * size[0])      # about 9 pixels a character
        if x + step > 1:
            x, y = 0.0, y - 0.45
        words_ax.text(x, y, f"{word} {a:.2f}", fontsize=9, va="center",
                      bbox=dict(fc=cmap(0.85 * a / peak), lw=0, alpha=0.9))
        x += step
    _save(fig, path)
    return {"regions": region_weights, "top_regions": order, "heat": heat,
            "words": list(zip(words, word_weights.tolist())), "lines": list(lines),
            "background": "image" if image is not None else "blank",
            "marked": dict(marked or {})}


# --- studies -----------------------------------------------------------------------------
def study_chart(path, rows: list[tuple[str, list[float]]], metric: str, title: str = "",
                size=None) -> dict:
    """One row per arm: a bar at the mean of its scores, the standard deviation as an error
    bar, every score as a dot. Returns {label: (mean, std)}."""
    drawn = {label: (float(np.mean(s)), float(np.std(s, ddof=1)) if len(s) > 1 else 0.0)
             for label, s in rows}
    fig = _figure(size or (760, 60 + 34 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, scores) in enumerate(rows):
        mean, std = drawn[label]
        ax.barh(i, mean, xerr=std, color="#4c72b0" if "random" not in label else "#999999",
                alpha=0.6, capsize=3)
        ax.scatter(scores, [i] * len(scores), color="black", s=10, zorder=3)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(title or metric, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return drawn
