"""Evaluation figures: the CMC curve and a grid of sampled query matches."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from training.data.transforms import read_image  # noqa: E402
from training.errors import DataError  # noqa: E402


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path, max_rank: int = 50) -> Path:
    """One line per curve (e.g. with and without re-ranking), rank 1..max_rank."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, cmc in curves.items():
        ranks = np.arange(1, min(max_rank, len(cmc)) + 1)
        ax.plot(ranks, cmc[: len(ranks)] * 100, label=f"{label} (rank-1 {cmc[0] * 100:.1f}%)")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title("CMC curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path, dpi=120)


def plot_matches(query, gallery, distmat: np.ndarray, path: str | Path, num_queries: int = 8, top_k: int = 8,
                 seed: int = 0) -> Path:
    """Rows of a query followed by its top-k gallery images (same-identity same-camera items
    removed, as the metrics do); a green frame marks a correct match, red a wrong one."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(query), size=min(num_queries, len(query)), replace=False))
    g_pids = np.array([r.pid for r in gallery])
    g_cams = np.array([r.camid for r in gallery])
    fig, axes = plt.subplots(len(picks), top_k + 1, figsize=(1.2 * (top_k + 1), 2.4 * len(picks)), squeeze=False)
    for row, qi in enumerate(picks):
        q = query[qi]
        order = np.argsort(distmat[qi], kind="stable")
        order = order[~((g_pids[order] == q.pid) & (g_cams[order] == q.camid))][:top_k]
        cells = [(q, None)] + [(gallery[j], gallery[j].pid == q.pid) for j in order]
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(cells):
                continue
            rec, correct = cells[col]
            try:
                ax.imshow(np.asarray(read_image(rec.path).resize((64, 128))))
            except DataError:  # the figure shows it; the figures in results.json do not depend on it
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.set_title(("query\n" if correct is None else f"#{col}\n") + f"id {rec.pid} c{rec.camid}", fontsize=7)
            if correct is not None:
                ax.add_patch(Rectangle((0, 0), 63, 127, fill=False, lw=3, edgecolor="limegreen" if correct else "red"))
    return _save(fig, path, dpi=100)


def _save(fig, path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
