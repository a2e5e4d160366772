"""The loss curve of a training run as a PNG (matplotlib, Agg canvas: no display, no pyplot
global state, so it works on headless machines and inside tests)."""
from __future__ import annotations

from pathlib import Path

from lmc.errors import LmcError


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LmcError("saving the loss plot needs matplotlib: pip install 'lmc[train]' "
                       "(or pass --plot none)") from None
    return Figure, FigureCanvasAgg


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so the trend shows through the noise of small batches."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_loss_plot(losses: list[float], path: str | Path, title: str,
                   val: tuple[int, float] | None = None) -> Path:
    """Writes the per-step training loss (and its moving average, and an optional validation
    loss at a step) to `path`; returns the path."""
    Figure, FigureCanvasAgg = _matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        ax.plot(steps, smooth(losses, window), color="tab:blue", linewidth=2,
                label=f"moving average ({window} steps)")
    if val is not None:
        ax.scatter([val[0]], [val[1]], color="tab:orange", zorder=3,
                   label=f"validation loss {val[1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
