"""A PNG of checkpoint scores by step, the best one marked."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lamin_lightning_core._events import CheckpointRecord


def plot_scores(records: list[CheckpointRecord], path: Path) -> None:
    """Plot the kept checkpoints' scores by global step into ``path``.

    Raises:
        ImportError: naming the extra, if matplotlib is not installed.
        ValueError: if no record has both a step and a score.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            'Plotting needs matplotlib: pip install "lamin-lightning[plot]"'
        ) from error
    points = [
        (r.global_step, r.score, r.is_best_model)
        for r in records
        if r.global_step is not None and r.score is not None
    ]
    if not points:
        raise ValueError(
            "None of the checkpoints has both a step in its file name and a score; "
            "nothing to plot."
        )
    figure, axes = plt.subplots(figsize=(7, 4))
    steps, scores, _ = zip(*points, strict=True)
    axes.plot(steps, scores, "o-", label="kept checkpoints")
    best = [(step, score) for step, score, is_best in points if is_best]
    if best:
        best_steps, best_scores = zip(*best, strict=True)
        axes.plot(best_steps, best_scores, "*", markersize=16, label="best")
    axes.set(
        xlabel="global step",
        ylabel=f"score ({records[0].mode or 'min'} is better)",
        title=records[0].key.rsplit("/", 1)[0],
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
