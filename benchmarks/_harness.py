"""Measuring pieces for ``bench_checkpoint.py``: timed callbacks, models, fits.

Nothing here imports lamindb: Django is reached lazily, once the benchmark
has created its throwaway LaminDB instance and imported lamindb itself.
"""

from __future__ import annotations

import contextlib
import cProfile
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

import lamin_lightning_core as ll

FEATURES = 32
BATCH_SIZE = 8
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


@dataclass
class SaveLog:
    """What one callback measured during one fit (seconds, bytes, queries)."""

    blocking: list[float] = field(default_factory=list)
    blocking_cpu: list[float] = field(default_factory=list)
    own_part: list[float] = field(default_factory=list)
    removing: list[float] = field(default_factory=list)
    persist: list[float] = field(default_factory=list)
    persist_cpu: list[float] = field(default_factory=list)
    persist_bytes: list[int] = field(default_factory=list)
    persist_queries: list[int] = field(default_factory=list)
    persist_sql: list[list[str]] = field(default_factory=list)
    deleting: list[float] = field(default_factory=list)
    delete_queries: list[int] = field(default_factory=list)
    delete_sql: list[list[str]] = field(default_factory=list)
    artifacts: list[Any] = field(default_factory=list)
    saved_files: list[Path] = field(default_factory=list)


class QueryCounter:
    """A Django ``execute_wrapper`` that records the SQL statements it sees."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any
    ) -> Any:
        self.statements.append(sql)
        return execute(sql, params, many, ctx)


@contextlib.contextmanager
def measure(
    times: list[float],
    queries: list[int] | None = None,
    statements: list[list[str]] | None = None,
    cpu: list[float] | None = None,
) -> Iterator[None]:
    """Append the wall time of the block to ``times``.

    With ``queries``, also count the SQL statements the block sends through
    Django's default connection, and keep their text in ``statements``. With
    ``cpu``, also record the block's CPU time on this thread: unlike wall
    time it leaves out waiting for the disk (fsync), which other processes on
    a shared machine make erratic.
    """
    counter = QueryCounter()
    if queries is None:
        wrapper: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    else:
        from django.db import connection

        wrapper = connection.execute_wrapper(counter)
    start, start_cpu = time.perf_counter(), time.thread_time()
    with wrapper:
        yield
    times.append(time.perf_counter() - start)
    if cpu is not None:
        cpu.append(time.thread_time() - start_cpu)
    if queries is not None:
        queries.append(len(counter.statements))
    if statements is not None:
        statements.append(counter.statements)


class TimedModelCheckpoint(ModelCheckpoint):
    """Plain ``ModelCheckpoint`` that times each save and removal.

    Args:
        copy_to: if given, ``cp`` each checkpoint into this folder right after
            it is saved, timed as ``persist``: the baseline for persistence,
            under the same write pressure.
    """

    def __init__(self, *args: Any, copy_to: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measured = SaveLog()
        self.copy_to = copy_to

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        m = self.measured
        with measure(m.blocking, cpu=m.blocking_cpu):
            super()._save_checkpoint(trainer, filepath)
        m.saved_files.append(Path(filepath))
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
            with measure(m.persist, cpu=m.persist_cpu):
                subprocess.run(["cp", filepath, str(self.copy_to)], check=True)
            m.persist_bytes.append(Path(filepath).stat().st_size)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        with measure(self.measured.removing):
            super()._remove_checkpoint(trainer, filepath)


class TimedCheckpoint(ll.Checkpoint):
    """``Checkpoint`` that also times persistence and counts its SQL queries.

    Persistence is timed where it happens, around the hook bus's ``persist``
    and ``delete`` calls: on the training thread when saves are synchronous,
    on the callback's worker thread when they are not. ``_save_checkpoint``
    and ``_remove_checkpoint`` are timed on the training thread (blocking).
    Set ``profiler`` to a ``cProfile.Profile`` to profile every persist call.
    ``defaults`` holds keyword arguments every instance gets (the benchmark's
    ``--sync`` puts ``asynchronous=False`` there).
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**self.defaults, **kwargs})
        self.measured = SaveLog()
        self.profiler: cProfile.Profile | None = None
        # The bus is private, but it is ours: the one place every persister
        # call goes through in both the synchronous and the threaded design.
        bus = self._bus
        persist, delete = bus.persist, bus.delete

        def timed_persist(request: ll.PersistRequest) -> ll.PersistedArtifact:
            m = self.measured
            profiling = self.profiler or contextlib.nullcontext()
            timed = measure(m.persist, m.persist_queries, m.persist_sql, m.persist_cpu)
            with timed, profiling:
                persisted = persist(request)
            m.persist_bytes.append(Path(request.local_path).stat().st_size)
            m.artifacts.append(persisted.artifact)
            return persisted

        def timed_delete(event: Any) -> None:
            m = self.measured
            with measure(m.deleting, m.delete_queries, m.delete_sql):
                delete(event)

        bus.persist = timed_persist  # type: ignore[method-assign]
        bus.delete = timed_delete  # type: ignore[method-assign]

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        with measure(self.measured.blocking, cpu=self.measured.blocking_cpu):
            super()._save_checkpoint(trainer, filepath)
        self.measured.saved_files.append(Path(filepath))

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        with measure(self.measured.removing):
            super()._remove_checkpoint(trainer, filepath)

    @override
    def save_artifact(self, trainer: pl.Trainer, local_path: Any, kind: Any) -> Any:
        # What a checkpoint save blocks beyond Lightning's own write: staging,
        # the journal line and, when the queue is full, waiting for a slot.
        if kind != "checkpoint":
            return super().save_artifact(trainer, local_path, kind)
        with measure(self.measured.own_part):
            return super().save_artifact(trainer, local_path, kind)


class TinyRegressor(pl.LightningModule):
    """A regressor on random data; ``ballast`` inflates the checkpoint.

    Args:
        ballast: a tensor kept as a persistent buffer (in every checkpoint,
            never trained), or ``None`` for a checkpoint of a few KB.
        hidden: width of two hidden layers; 0 for one linear layer, whose
            steps cost next to nothing, so that the fit is all overhead.
    """

    def __init__(self, ballast: torch.Tensor | None = None, hidden: int = 0) -> None:
        super().__init__()
        # Same weights every fit: both callbacks see the same losses, hence
        # the same top-k decisions and the same number of saves.
        torch.manual_seed(0)
        if hidden:
            self.layer: torch.nn.Module = torch.nn.Sequential(
                torch.nn.Linear(FEATURES, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, 1),
            )
        else:
            self.layer = torch.nn.Linear(FEATURES, 1)
        if ballast is not None:
            self.register_buffer("ballast", ballast)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def random_loader(steps: int) -> DataLoader[Any]:
    """One epoch of exactly ``steps`` batches of random regression data."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH_SIZE, FEATURES, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), BATCH_SIZE)


def ballast(megabytes: int) -> torch.Tensor:
    """Random float32 values filling ``megabytes`` MiB."""
    return torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).uniform_()


def timed_fit(
    callback: pl.Callback, root: Path, steps: int, model: pl.LightningModule
) -> float:
    """Fit ``model`` for ``steps`` steps with ``callback``; wall time of fit()."""
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=steps, callbacks=[callback], **TRAINER_DEFAULTS
    )
    loader = random_loader(steps)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else math.nan


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank), or NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def tenths(values: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and the last tenth of ``values`` (at least one)."""
    n = max(1, len(values) // 10)
    return median(values[:n]), median(values[-n:])


def window(values: Sequence[float], center: int, half: int = 5) -> float:
    """Median of ``values`` around the 1-based position ``center``."""
    low = max(0, center - 1 - half)
    return median(values[low : center + half])
