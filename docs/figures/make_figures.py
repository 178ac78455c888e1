"""Draw docs/figures/tensor_layouts.png: the modes of several methods' adapter tensors.

Run: python docs/figures/make_figures.py  (matplotlib, Agg backend)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

STRUCTURAL, FEATURE = "#f4a261", "#8ecae6"
ROWS = [
    ("LoRA (per layer)", "lora", [("in", 768, 0), ("out", 768, 0)], "one small tensor per target"),
    (
        "CaRA tensor 1",
        "cp + λ",
        [("depth*qkv", 36, 1), ("in", 768, 0), ("heads", 12, 0), ("head_dim", 64, 0)],
        "ΔW(l,k)[h·64+e, i] = T[3l+k, i, h, e]",
    ),
    (
        "CaRA tensor 2",
        "cp + λ",
        [("depth*qkv*slices", 108, 1), ("out", 768, 0), ("in (residual)", 768, 0)],
        "per block: o, fc1 ×4, fc2 ×4 (fc2 transposed)",
    ),
    (
        "TensLoRA qkv_depth",
        "tucker",
        [("in", 768, 0), ("out", 768, 0), ("qkv", 3, 1), ("depth", 12, 1)],
        "one tensor for every q, k, v",
    ),
    (
        "FacT-TT",
        "tt",
        [("in", 768, 0), ("depth*qkv*slices", 144, 1), ("out", 768, 0)],
        "ΔW_s = V Σ_s U",
    ),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.45, len(ROWS) + 0.1)
    ax.axis("off")
    for row, (title, fac, modes, note) in enumerate(ROWS):
        y = len(ROWS) - row - 0.5
        ax.text(0.05, y + 0.12, title, fontsize=10, weight="bold", va="center")
        ax.text(0.05, y - 0.18, f"× {fac}", fontsize=9, va="center", color="#555")
        x = 2.3
        for name, size, structural in modes:
            width = 0.55 + 0.32 * (len(str(size)) + len(name) / 4)
            box = FancyBboxPatch(
                (x, y - 0.28),
                width,
                0.56,
                boxstyle="round,pad=0.02",
                fc=STRUCTURAL if structural else FEATURE,
                ec="#333",
            )
            ax.add_patch(box)
            ax.text(x + width / 2, y + 0.08, name, ha="center", va="center", fontsize=8.5)
            ax.text(x + width / 2, y - 0.14, str(size), ha="center", va="center", fontsize=8)
            x += width + 0.12
        ax.text(x + 0.1, y, note, fontsize=8.5, va="center", color="#333")
    ax.add_patch(Rectangle((2.3, -0.32), 0.3, 0.16, fc=STRUCTURAL, ec="#333"))
    ax.text(2.7, -0.24, "structural mode (which target / slice)", fontsize=8, va="center")
    ax.add_patch(Rectangle((6.0, -0.32), 0.3, 0.16, fc=FEATURE, ec="#333"))
    ax.text(6.4, -0.24, "feature mode (matrix side, heads)", fontsize=8, va="center")
    ax.set_title("Adapter tensors = modes × factorisation (sizes for ViT-B/16)", fontsize=11)
    out = Path(__file__).with_name("tensor_layouts.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
