"""MoE observability: per-layer routing metrics, the progress-line load summary, the load heat map.

Loads are reported relative to a perfectly balanced router (load x E: 1.0 = balanced).
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from podtrain.model.config import ModelConfig  # noqa: E402
from podtrain.train import metrics as metrics_io  # noqa: E402

LOAD_PNG = "moe_load.png"
_LOAD_KEY = re.compile(r"moe/layer(\d+)/load_e(\d+)$")


def moe_layers(model: ModelConfig) -> list[int]:
    return [i for i in range(model.num_layers) if model.moe.is_moe_layer(i)]


def flatten(stats: dict, layers: list[int]) -> dict[str, float]:
    """Flat metrics from the step's stacked (L, ...) MoE statistics (host arrays)."""
    row = {}
    for li, layer in enumerate(layers):
        p = f"moe/layer{layer}/"
        for j, v in enumerate(np.asarray(stats["load"][li])):
            row[f"{p}load_e{j}"] = float(v)
        for j, v in enumerate(np.asarray(stats["bias"][li])):
            row[f"{p}bias_e{j}"] = float(v)
        row[p + "dropped"] = float(stats["dropped"][li])
        row[p + "entropy"] = float(stats["entropy"][li])
    relative = np.asarray(stats["load"]) * np.asarray(stats["load"]).shape[-1]
    row |= {
        "moe/load_max": float(relative.max()),
        "moe/load_min": float(relative.min()),
        "moe/dropped": float(np.mean(stats["dropped"])),
        "moe/lb_loss": float(np.sum(stats["lb_loss"])),
        "moe/z_loss": float(np.sum(stats["z_loss"])),
        "moe/aux_loss": float(np.sum(stats["aux_loss"])),
    }
    return row


def summary(row: dict[str, float]) -> str:
    """One line for the progress output: the most and least loaded expert over all layers."""
    return f"{row['moe/load_max']:.2f}/{row['moe/load_min']:.2f}"


def load_matrix(rows: list[dict]) -> tuple[list[int], np.ndarray]:
    """(layer ids, layers x experts relative load) from the last logged row that has loads."""
    for row in reversed(rows):
        cells = [(int(m[1]), int(m[2]), v) for k, v in row.items() if (m := _LOAD_KEY.match(k))]
        if cells:
            layers = sorted({c[0] for c in cells})
            experts = max(c[1] for c in cells) + 1
            grid = np.zeros((len(layers), experts))
            for layer, e, v in cells:
                grid[layers.index(layer), e] = v * experts
            return layers, grid
    return [], np.zeros((0, 0))


def plot_load(run_dir: Path) -> Path | None:
    """moe_load.png: relative load per (MoE layer, expert) at the last logged step."""
    rows = metrics_io.read(run_dir)
    layers, grid = load_matrix(rows)
    if not layers:
        return None
    step = max(r["step"] for r in rows if any(_LOAD_KEY.match(k) for k in r))
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * grid.shape[1], 1.2 + 0.4 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < grid.max() / 2 else "k")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title(f"{Path(run_dir).name}: expert load x E at step {step} (1 = balanced)")
    fig.colorbar(im, ax=ax)
    path = Path(run_dir) / LOAD_PNG
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
