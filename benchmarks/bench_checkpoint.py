"""Benchmark lamin-lightning's ``Checkpoint`` against Lightning's ``ModelCheckpoint``.

    .venv/bin/python benchmarks/bench_checkpoint.py           # ~8 minutes
    .venv/bin/python benchmarks/bench_checkpoint.py --quick   # smoke run

Everything runs in this one process on CPU, against a throwaway local LaminDB
instance created under a temporary folder (settings and cache isolated there,
registrar plugins switched off). Each scenario fits the same tiny model once
with a timed ``ModelCheckpoint`` and once with a timed ``Checkpoint``,
alternating the order, ``--repeats`` times; the report gives medians, the
ratio and the target from the issues, marked PASS or MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import _harness as h
import _report as r

DISABLED_PLUGINS = "wandb,mlflow,clearml,recorder"
MONITOR = {"monitor": "train_loss", "mode": "min", "every_n_train_steps": 1}
BACKENDS = ("lamindb", "lamindb_setup", "django", "wandb", "mlflow", "clearml")
IMPORT_PROBE = """
import json, sys, time
start = time.perf_counter()
import lightning
middle = time.perf_counter()
if {with_core}:
    import lamin_lightning_core
    lamin_lightning_core.Checkpoint  # what a user needs, even if loaded lazily
end = time.perf_counter()
loaded = [name for name in {backends!r} if name in sys.modules]
if {with_core}:
    lamin_lightning_core.Checkpoint()  # pydantic and the installed plugins load here
built = time.perf_counter()
times = {{"lightning": middle - start, "core": end - middle, "first": built - end}}
print(json.dumps({{**times, "loaded": loaded}}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks every size for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat")
    parser.add_argument(
        "--repeats", type=int, help="fits per callback (default 4; half in (c))"
    )
    parser.add_argument("--steps-a", type=int, help="steps of (a) (default 100)")
    parser.add_argument("--steps-b", type=int, help="steps of (b) (default 300)")
    parser.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="hidden width of the model of (a) and (b); 0 (default) is one "
        "linear layer, whose steps cost next to nothing",
    )
    parser.add_argument("--kept", type=int, help="saves of the growth run (500)")
    parser.add_argument("--big-mb", type=int, help="checkpoint size of (c) (1024)")
    parser.add_argument("--import-repeats", type=int, help="import probes (5)")
    parser.add_argument("--profile-saves", type=int, help="saves to profile (20)")
    parser.add_argument("--bare-saves", type=int, help="bare lamindb saves (50)")
    parser.add_argument(
        "--sync",
        action="store_true",
        help="Checkpoint(asynchronous=False): persist on the training thread",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    quick, full = (1, 20, 40, 60, 32, 2, 5, 10), (4, 100, 300, 500, 1024, 5, 20, 50)
    names = ("repeats", "steps_a", "steps_b", "kept", "big_mb")
    names += ("import_repeats", "profile_saves", "bare_saves")
    sizes = quick if args.quick else full
    for name, default in zip(names, sizes, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def progress(message: str) -> None:
    """One line on stderr so a long run shows it is alive."""
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def quiet_third_parties() -> None:
    """Silence Lightning's per-fit info lines and its known CPU-only warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in ("does not have many workers", "GPU available", "litlogger"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def create_instance(root: Path) -> tuple[ModuleType, str]:
    """Create a local LaminDB instance under ``root``, import lamindb, track.

    Settings and cache live under ``root``, so the user's own LaminDB
    configuration is neither read nor changed.
    """
    from lamin_lightning_adapters.lamindb import (
        ensure_local_instance,
        mark_local_instance_offline_safe,
    )

    os.environ.pop("LAMIN_CURRENT_INSTANCE", None)
    os.environ["LAMIN_SETTINGS_DIR"] = str(root / "settings")
    os.environ["LAMIN_CACHE_DIR"] = str(root / "cache")
    # `lamin init` runs as a subprocess: find the CLI next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    slug = ensure_local_instance(root, f"ll-bench-{os.getpid()}")
    mark_local_instance_offline_safe()
    import lamindb as ln

    ln.track()
    ln.settings.verbosity = "error"  # set after track(), which resets it
    return ln, slug


@dataclass
class Pair:
    """Fits of one scenario, per variant: ``plain`` (``ModelCheckpoint``),
    ``ours`` (``Checkpoint``) and, in (c), ``cp`` (``ModelCheckpoint`` plus a
    ``cp`` of each checkpoint right after it is written)."""

    name: str
    walls: dict[str, list[float]] = field(default_factory=dict)
    logs: dict[str, list[h.SaveLog]] = field(default_factory=dict)

    @property
    def plain(self) -> list[h.SaveLog]:
        return self.logs["plain"]

    @property
    def ours(self) -> list[h.SaveLog]:
        return self.logs["ours"]

    def wall_ratio(self) -> float:
        return h.median(self.walls["ours"]) / h.median(self.walls["plain"])

    def pooled(self, which: str, attribute: str) -> list[float]:
        """One measurement list pooled over every fit of ``which``."""
        return [value for log in self.logs[which] for value in getattr(log, attribute)]


def make_callback(which: str, dirpath: Path, kwargs: dict[str, Any]) -> Any:
    """The timed callback of a variant (see :class:`Pair`)."""
    if which == "ours":
        return h.TimedCheckpoint(dirpath=dirpath, **kwargs)
    copy_to = dirpath.with_name(f"{dirpath.name}-copies") if which == "cp" else None
    return h.TimedModelCheckpoint(dirpath=dirpath, copy_to=copy_to, **kwargs)


def run_pair(
    name: str,
    root: Path,
    steps: int,
    repeats: int,
    callback_kwargs: dict[str, Any],
    make_model: Any = h.TinyRegressor,
    after_fit: Any = None,
    variants: tuple[str, ...] = ("plain", "ours"),
) -> Pair:
    """Fit ``repeats`` times per variant, rotating which goes first."""
    pair = Pair(name)
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for which in variants[shift:] + variants[:shift]:
            dirpath = root / name / f"{which}-{repeat}"
            callback = make_callback(which, dirpath, callback_kwargs)
            gc.collect()
            if after_fit is not None:
                os.sync()  # large files: start without the last fit's write-back
            wall = h.timed_fit(callback, dirpath.parent, steps, make_model())
            saves = len(callback.measured.blocking)
            progress(
                f"({name}) {which:5} fit {repeat + 1}/{repeats}: "
                f"{wall:.2f} s, {saves} saves"
            )
            pair.walls.setdefault(which, []).append(wall)
            pair.logs.setdefault(which, []).append(callback.measured)
            if after_fit is not None:
                after_fit(which, callback)
    return pair


def warm_up(root: Path) -> None:
    """Short fits per callback, so first-use costs stay out of the numbers."""
    run_pair("warmup-all", root, 5, 1, {**MONITOR, "save_top_k": -1})
    run_pair("warmup-top", root, 20, 1, {**MONITOR, "save_top_k": 3})


def growth_run(root: Path, kept: int) -> h.SaveLog:
    """One keep-all fit of ``kept`` steps: how a save costs as checkpoints pile up."""
    callback = h.TimedCheckpoint(dirpath=root / "growth", save_top_k=-1, **MONITOR)
    wall = h.timed_fit(callback, root, kept, h.TinyRegressor())
    progress(f"(growth) {kept} kept checkpoints: {wall:.2f} s")
    return callback.measured


def profile_run(root: Path, saves: int) -> tuple[Any, h.SaveLog]:
    """Profile ``saves`` persisted saves of a keep-all fit (after the growth run)."""
    import cProfile

    callback = h.TimedCheckpoint(dirpath=root / "profile", save_top_k=-1, **MONITOR)
    callback.profiler = cProfile.Profile()
    h.timed_fit(callback, root, saves, h.TinyRegressor())
    progress(f"(profile) {saves} saves profiled")
    return callback.profiler, callback.measured


def bare_saves(ln: ModuleType, source: Path, count: int) -> h.SaveLog:
    """``count`` bare ``ln.Artifact(...).save()`` of one checkpoint file, timed
    as ``persist``: what lamindb itself costs, without the callback around it."""
    log = h.SaveLog()
    for index in range(count):
        with h.measure(log.persist, cpu=log.persist_cpu):
            ln.Artifact(
                source,
                key=f"bench-bare/{index}.ckpt",
                kind="model",
                skip_hash_lookup=True,
            ).save()
    progress(f"(bare) {count} bare lamindb saves")
    return log


def wal_run(root: Path, steps: int) -> h.SaveLog:
    """A keep-all fit after switching SQLite to WAL with synchronous=NORMAL.

    A what-if for the suggestions, not a target; it changes the instance, so
    it runs last.
    """
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    callback = h.TimedCheckpoint(dirpath=root / "wal", save_top_k=-1, **MONITOR)
    wall = h.timed_fit(callback, root, steps, h.TinyRegressor())
    progress(f"(what-if) WAL + synchronous=NORMAL, {steps} saves: {wall:.2f} s")
    return callback.measured


@dataclass
class CopyBaseline:
    """Copy and hash times of one large checkpoint file (seconds)."""

    size: int = 0
    copyfile: list[float] = field(default_factory=list)
    cp: list[float] = field(default_factory=list)
    lamin_hash: list[float] = field(default_factory=list)


def big_checkpoint(args: argparse.Namespace, root: Path) -> tuple[Pair, CopyBaseline]:
    """(c): three saves of a model holding ``--big-mb`` MiB, plus copy baselines.

    Variant ``cp`` is the baseline of the throughput target: ``cp`` of each
    checkpoint right after Lightning wrote it, under the same page-cache
    write-back that persistence sees. Copies of a settled file are context.
    """
    from lamindb_setup.core.hashing import hash_file

    tensor = h.ballast(args.big_mb)
    baseline = CopyBaseline()
    target = root / "storage" / "cp-baseline"

    def after_fit(which: str, callback: Any) -> None:
        files = callback.measured.saved_files
        if which == "plain" and not baseline.cp:
            baseline.size = files[0].stat().st_size
            for _ in range(3):
                with h.measure(baseline.copyfile):
                    shutil.copyfile(files[0], target)
                target.unlink()
                with h.measure(baseline.cp):
                    subprocess.run(["cp", str(files[0]), str(target)], check=True)
                target.unlink()
                with h.measure(baseline.lamin_hash):
                    hash_file(files[0])
        for artifact in callback.measured.artifacts:
            artifact.delete(permanent=True, storage=True)
        for folder in (files[0].parent, getattr(callback, "copy_to", None)):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    kwargs = {**MONITOR, "save_top_k": -1}
    repeats = max(1, args.repeats // 2)
    variants = ("plain", "ours", "cp")
    pair = run_pair(
        "c",
        root,
        3,
        repeats,
        kwargs,
        lambda: h.TinyRegressor(tensor),
        after_fit,
        variants,
    )
    return pair, baseline


@dataclass
class ImportTimes:
    """Fresh-interpreter import times in seconds, and backends the core pulled."""

    lightning_only: list[float] = field(default_factory=list)
    with_core: list[float] = field(default_factory=list)
    core_delta: list[float] = field(default_factory=list)
    first_checkpoint: list[float] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    packages: list[tuple[str, float]] = field(default_factory=list)


def import_times(repeats: int) -> ImportTimes:
    """Time ``import lightning`` alone and followed by the core, alternately."""
    result = ImportTimes()
    for _ in range(repeats):
        for with_core in (False, True):
            code = IMPORT_PROBE.format(with_core=with_core, backends=BACKENDS)
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            total = probe["lightning"] + probe["core"]
            if with_core:
                result.with_core.append(total)
                result.core_delta.append(probe["core"])
                result.first_checkpoint.append(probe["first"])
                result.loaded.update(probe["loaded"])
            else:
                result.lightning_only.append(total)
    result.packages = importtime_packages()
    progress(f"(import) {repeats} probes each")
    return result


def importtime_packages() -> list[tuple[str, float]]:
    """Self import time (s) per top-level package the core adds to lightning."""
    code = "import lightning; import lamin_lightning_core as ll; ll.Checkpoint"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = re.findall(r"import time:\s+(\d+) \|\s+\d+ \|( *)(\S+)", done.stderr)
    # One space before a top-level module, two more per level of nesting.
    top_level = [i for i, row in enumerate(rows) if len(row[1]) == 1]
    lightning_end = max(i for i in top_level if rows[i][2] == "lightning")
    per_package: Counter[str] = Counter()
    for self_us, _, module in rows[lightning_end + 1 :]:
        per_package[module.split(".")[0]] += int(self_us) / 1e6
    return per_package.most_common()


def checkpoint_mode(sync: bool) -> str:
    """Configure the timed ``Checkpoint`` for ``--sync`` and describe its mode.

    Raises:
        SystemExit: for ``--sync`` with a ``Checkpoint`` that has no
            ``asynchronous`` option (persistence is synchronous already).
    """
    import inspect

    import lamin_lightning_core as ll

    parameters = inspect.signature(ll.Checkpoint.__init__).parameters
    if "asynchronous" not in parameters:
        if sync:
            raise SystemExit(
                "--sync: this Checkpoint has no `asynchronous` option; it always "
                "persists on the training thread. Run without --sync."
            )
        return "synchronous (this Checkpoint has no asynchronous option)"
    if sync:
        h.TimedCheckpoint.defaults = {"asynchronous": False}
        return "asynchronous=False (--sync): persisted on the training thread"
    default = parameters["asynchronous"].default
    return f"asynchronous={default} (the default)"


def load_text(load: tuple[float, float, float] | None = None) -> str:
    """The 1, 5 and 15 minute load averages, now or as given."""
    return " / ".join(f"{value:.1f}" for value in load or os.getloadavg())


def versions() -> str:
    """Versions of the stack, for the report header."""
    names = ("torch", "lightning", "lamindb-core", "lamindb_setup", "Django")
    found = ", ".join(f"{name} {version(name)}" for name in names)
    return f"Python {platform.python_version()}, {found}"


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print the report to stdout."""
    args = parse_args(argv)
    os.environ["LAMIN_LIGHTNING_DISABLE_PLUGINS"] = DISABLED_PLUGINS
    root = Path(tempfile.mkdtemp(prefix="ll-bench-")).resolve()
    report_stream = sys.stdout
    try:
        # lamindb talks on stdout (and ln.track() wraps it): send that to
        # stderr, so stdout carries the report only.
        with contextlib.redirect_stdout(sys.stderr):
            text = run_all(args, root)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(root, ignore_errors=True)
    print(text, file=report_stream)
    return 0


def run_all(args: argparse.Namespace, root: Path) -> str:
    """Every measurement; returns the report."""
    quiet_third_parties()
    mode = checkpoint_mode(args.sync)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    progress(f"temp dir {root}")
    ln, slug = create_instance(root)
    warm_up(root)
    model = functools.partial(h.TinyRegressor, hidden=args.hidden)
    a = run_pair(
        "a", root, args.steps_a, args.repeats, {**MONITOR, "save_top_k": 3}, model
    )
    b = run_pair(
        "b", root, args.steps_b, args.repeats, {**MONITOR, "save_top_k": -1}, model
    )
    growth = growth_run(root, args.kept)
    bare = bare_saves(ln, growth.saved_files[0], args.bare_saves)
    c, baseline = big_checkpoint(args, root)
    profiler, profiled = profile_run(root, args.profile_saves)
    wal = wal_run(root, args.bare_saves)
    imports = import_times(args.import_repeats)
    header = r.Header(
        started=started.isoformat(timespec="minutes"),
        cpus=os.cpu_count() or 0,
        load=f"{load_text(load_before)} at the start, {load_text()} at the end",
        versions=versions(),
        instance=f"{slug} (SQLite) under {root}",
        artifacts=ln.Artifact.filter().count(),
        disabled=DISABLED_PLUGINS,
        mode=mode,
        options=vars(args),
    )
    breakdown = r.section_breakdown(growth, bare, wal)
    report = r.build(header, a, b, growth, c, baseline, imports, breakdown)
    ln.finish()
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str))
    return r.render(report) + "\n" + r.render_profile(profiler, profiled, a.ours[0])


if __name__ == "__main__":
    sys.exit(main())
