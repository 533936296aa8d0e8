"""A bounded background worker: persistence off the training thread.

One daemon thread per :class:`~lamin_lightning_core.Checkpoint`, started with
the first job. Jobs run one at a time in submission order, so the events of
one key keep their order and a removal never overtakes its save.

Back-pressure: at most ``max_pending`` jobs wait while one runs. When the
backend is slower than training, :meth:`Worker.submit` blocks the training
thread before the next file is staged, so memory and staged files stay
bounded instead of piling up.

A job that raises is loud, as on the training thread: the first error is
re-raised there at the next :meth:`Worker.submit` or :meth:`Worker.flush`.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

T = TypeVar("T")

PROGRESS_AFTER_SECONDS = 1.0
"""A flush that takes longer than this shows a progress bar on stderr."""


class _Job(Generic[T]):
    def __init__(self, run: Callable[[], T]) -> None:
        self.run = run
        self.future: Future[T] = Future()


class Worker:
    """Run jobs in order on one background thread, or inline.

    Args:
        name: the thread's name, shown in tracebacks and debuggers.
        max_pending: how many jobs may wait while one runs; one more blocks
            the caller of :meth:`submit` until a job is done.
        synchronous: run every job inline in :meth:`submit` instead.

    Raises:
        ValueError: if ``max_pending`` is not a whole number >= 0.
    """

    def __init__(self, name: str, *, max_pending: int, synchronous: bool) -> None:
        if (
            isinstance(max_pending, bool)
            or not isinstance(max_pending, int)
            or max_pending < 0
        ):
            raise ValueError(
                f"max_pending={max_pending!r} is not a count: pass a whole number "
                ">= 0 of saves that may wait while one is persisted (default 4)."
            )
        self.name = name
        self.max_pending = max_pending
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[_Job[object] | None] = queue.SimpleQueue()
        self._slots = threading.Semaphore(max_pending + 1)
        self._done = threading.Condition()
        self._submitted = 0
        self._completed = 0
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (waiting or running)."""
        with self._done:
            return self._submitted - self._completed

    def submit(self, stage: Callable[[], Callable[[], T]]) -> Future[T]:
        """Wait for a free slot, call ``stage`` here, run its result in order.

        ``stage`` runs on the calling thread once a slot is free, so whatever
        it prepares (a staged file) is bounded by ``max_pending`` + 1. It
        returns the job to run on the worker.

        Returns:
            A future of the job's result; done already in synchronous mode.

        Raises:
            BaseException: the first error of an earlier job that was not
                raised yet (after ``stage`` ran, without running its job); in
                synchronous mode, the job's own error.
        """
        if self.synchronous:
            job = _Job(stage())
            job.future.set_result(job.run())
            return job.future
        self._slots.acquire()
        try:
            job = _Job(stage())
            # An earlier job's error is raised only now: what ``stage`` just
            # prepared (a staged file, its journal line) stays for a replay.
            self.raise_failure()
        except BaseException:
            self._slots.release()
            raise
        with self._done:
            self._submitted += 1
        self._ensure_thread()
        self._queue.put(job)  # type: ignore[arg-type]
        return job.future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run.

        Shows a progress bar on stderr if this takes longer than
        :data:`PROGRESS_AFTER_SECONDS`.

        Returns:
            ``True`` if all jobs ran, ``False`` if ``timeout`` expired first.

        Raises:
            BaseException: the first error of a job, not raised before.
        """
        with self._done:
            target, start = self._submitted, self._completed
        patience = PROGRESS_AFTER_SECONDS
        done = self._wait(
            target, patience if timeout is None else min(patience, timeout)
        )
        if not done and (timeout is None or timeout > patience):
            remaining = None if timeout is None else timeout - patience
            done = self._wait_with_progress(target, start, remaining)
        self.raise_failure()
        return done

    def stop(self) -> None:
        """Run what is queued, then end the thread (a new job restarts it)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def raise_failure(self) -> None:
        """Raise the first error of a job, once."""
        with self._done:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=self.name, daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        try:
            while (job := self._queue.get()) is not None:
                self._run(job)
        finally:
            _close_database_connections()

    def _run(self, job: _Job[object]) -> None:
        job.future.set_running_or_notify_cancel()
        try:
            result = job.run()
        except BaseException as error:
            # The worker must outlive any job; the error is not swallowed but
            # raised on the training thread (see raise_failure).
            self._record(error)
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        finally:
            self._slots.release()
            with self._done:
                self._completed += 1
                self._done.notify_all()

    def _record(self, error: BaseException) -> None:
        with self._done:
            first = self._failure is None
            if first:
                self._failure = error
        if first:
            log.error(
                "Background persistence failed: %s (raised on the training "
                "thread at the next save or when the fit ends)",
                error,
            )
        else:
            log.error("Background persistence failed again", exc_info=error)

    def _wait(self, target: int, timeout: float | None) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self._completed >= target, timeout)

    def _wait_with_progress(
        self, target: int, start: int, timeout: float | None
    ) -> bool:
        from rich.console import Console
        from rich.progress import Progress

        with self._done:
            waiting = target - self._completed
        log.info("Waiting for %d pending save(s) to be persisted", waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(
                "lamin-lightning: persisting checkpoints", total=target - start
            )
            while True:
                step = 0.25
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                done = self._wait(target, step)
                with self._done:
                    progress.update(
                        task, completed=min(self._completed, target) - start
                    )
                if done or (deadline is not None and time.monotonic() >= deadline):
                    return done


def _close_database_connections() -> None:
    # Django opens one database connection per thread; the worker's would stay
    # open after the thread ends. The core never imports Django: only close
    # what lamindb (or another persister) opened on this thread.
    db = sys.modules.get("django.db")
    conf = sys.modules.get("django.conf")
    if db is None or conf is None or not conf.settings.configured:
        return
    db.connections.close_all()
