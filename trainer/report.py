"""Run outputs for people: the S/DG plot."""
from __future__ import annotations

import io
from pathlib import Path

from mft_cache.files import write_bytes_atomic


def plot_s_dg(evals: list[dict], path: Path, title: str) -> bool:
    """Plot S and DG over steps from the evaluation records; returns False if there is nothing to plot."""
    points = [e for e in evals if e.get("S") is not None or e.get("DG") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [e["step"] for e in points]
    if any(e.get("S") is not None for e in points):
        ax.plot(steps, [100 * e["S"] if e.get("S") is not None else float("nan") for e in points], "o-",
                label="S: specialization (ppl drop, specialized domain)")
    if any(e.get("DG") is not None for e in points):
        ax.plot(steps, [100 * e["DG"] if e.get("DG") is not None else float("nan") for e in points], "s-",
                label="DG: degeneralization (ppl rise, general domain)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("% relative to the start")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return True
