"""Turn the measurements of ``bench_checkpoint.py`` into a plain-text report.

Every target comes from the performance issues; a row with a target is
marked PASS or MISS, a row without one is context.
"""

from __future__ import annotations

import dataclasses
import math
import pstats
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _harness as h

if TYPE_CHECKING:
    import cProfile

    from bench_checkpoint import CopyBaseline, ImportTimes, Pair

COLUMNS = ("ModelCheckpoint", "Checkpoint")
MB = 2**20


@dataclass(frozen=True)
class Header:
    """Where and when the numbers were taken."""

    started: str
    cpus: int
    load: str
    versions: str
    instance: str
    artifacts: int
    disabled: str
    mode: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One metric: two values, their ratio, a target and its verdict."""

    metric: str
    left: str
    right: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Section:
    """A titled table; ``columns`` name the two value columns."""

    title: str
    rows: list[Row]
    columns: tuple[str, str] = COLUMNS
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The header and every section, in print order."""

    header: Header
    sections: list[Section]
    raw: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def sec(seconds: float) -> str:
    return f"{seconds:.2f} s"


def times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fit_rows(pair: Pair, wall_target: float | None, small: bool = True) -> list[Row]:
    """Fit wall, blocking per save and persistence rows shared by (a)-(c).

    The 5 ms blocking target applies to ``small`` checkpoints only.
    """
    ratio = pair.wall_ratio()
    plain_block = pair.pooled("plain", "blocking")
    ours_block = pair.pooled("ours", "blocking")
    rows = [
        Row(
            "fit wall, median",
            sec(h.median(pair.walls["plain"])),
            sec(h.median(pair.walls["ours"])),
            times(ratio),
            f"<= {wall_target:.2f}x" if wall_target else "",
            verdict(ratio <= wall_target) if wall_target else "",
        ),
        Row(
            "blocking per save, median",
            ms(h.median(plain_block)),
            ms(h.median(ours_block)),
            times(h.median(ours_block) / h.median(plain_block)),
            "< 5 ms" if small else "",
            verdict(h.median(ours_block) < 0.005) if small else "",
        ),
        Row(
            "  of which Checkpoint's own part, median",
            "",
            ms(h.median(pair.pooled("ours", "own_part"))),
        ),
        Row(
            "blocking per save, p95",
            ms(h.p95(plain_block)),
            ms(h.p95(ours_block)),
            times(h.p95(ours_block) / h.p95(plain_block)),
        ),
        Row(
            "persistence per save (worker), median",
            "",
            ms(h.median(ours_persist(pair))),
        ),
        Row(
            "SQL queries per persist, median",
            "0",
            f"{h.median(pair.pooled('ours', 'persist_queries')):g}",
        ),
        Row(
            "saves per fit, median",
            f"{h.median([len(log.blocking) for log in pair.plain]):g}",
            f"{h.median([len(log.blocking) for log in pair.ours]):g}",
        ),
    ]
    return rows


def ours_persist(pair: Pair) -> list[float]:
    return pair.pooled("ours", "persist")


def section_a(pair: Pair, steps: int, repeats: int) -> Section:
    """(a) top-3 by train_loss, every step."""
    rows = fit_rows(pair, 1.10)
    removing = (pair.pooled("plain", "removing"), pair.pooled("ours", "removing"))
    rows.append(
        Row(
            "removal per eviction, median",
            ms(h.median(removing[0])),
            ms(h.median(removing[1])),
            times(h.median(removing[1]) / h.median(removing[0])),
        )
    )
    deleting = h.median(pair.pooled("ours", "deleting"))
    rows.append(Row("persister delete (worker), median", "", ms(deleting)))
    queries = pair.pooled("ours", "delete_queries")
    rows.append(Row("SQL queries per delete, median", "0", f"{h.median(queries):g}"))
    title = f"(a) {steps} steps, save_top_k=3 by train_loss, every step"
    return Section(f"{title} ({repeats} fits each)", rows)


def section_b(pair: Pair, steps: int, repeats: int) -> Section:
    """(b) keep all, every step: fit ratio and how a save ages within a fit."""
    rows = fit_rows(pair, 1.25)
    growth = {}
    for which in ("plain", "ours"):
        logs = pair.logs[which]
        firsts, lasts = zip(*(h.tenths(log.blocking) for log in logs), strict=True)
        growth[which] = (h.median(firsts), h.median(lasts))
    for index, label in enumerate(("first", "last")):
        rows.append(
            Row(
                f"blocking per save, {label} tenth",
                ms(growth["plain"][index]),
                ms(growth["ours"][index]),
            )
        )
    ours_growth = growth["ours"][1] / growth["ours"][0]
    rows.append(
        Row(
            "  last tenth / first tenth",
            times(growth["plain"][1] / growth["plain"][0]),
            times(ours_growth),
            "",
            "<= 1.20x",
            verdict(ours_growth <= 1.20),
        )
    )
    rows += tenth_rows(pair.ours, "persist", "persistence, last/first tenth")
    title = f"(b) {steps} steps, save_top_k=-1 (keep all), every step"
    return Section(f"{title} ({repeats} fits each)", rows)


def tenth_rows(logs: list[h.SaveLog], attribute: str, label: str) -> list[Row]:
    """Last/first tenth ratios of ``attribute`` in wall and in CPU time, the
    median over ``logs``; the CPU ratio leaves out waiting for the disk."""
    rows = []
    for suffix, target in (("", ""), ("_cpu", "<= 1.20x")):
        ratios = []
        for log in logs:
            first, last = h.tenths(getattr(log, attribute + suffix))
            ratios.append(last / first)
        ratio = h.median(ratios)
        rows.append(
            Row(
                f"  {label}, {'CPU' if suffix else 'wall'}",
                "",
                times(ratio),
                "",
                target,
                verdict(ratio <= 1.20) if target else "",
            )
        )
    return rows


def section_growth(log: h.SaveLog, kept: int) -> Section:
    """One long keep-all fit: queries and time per save at ~10 and ~``kept``."""
    queries = [float(q) for q in log.persist_queries]
    early, late = h.window(queries, 10), h.window(queries, kept)
    persist = (h.window(log.persist, 10), h.window(log.persist, kept))
    persist_cpu = (h.window(log.persist_cpu, 10), h.window(log.persist_cpu, kept))
    first, last = h.tenths(log.blocking)
    first_cpu, last_cpu = h.tenths(log.blocking_cpu)
    rows = [
        Row(
            "SQL queries per persist (median of 11)",
            f"{early:g}",
            f"{late:g}",
            times(late / early),
            "constant",
            verdict(late == early),
        ),
        Row(
            "SQL queries per persist, min-max",
            f"{min(queries[:10]):g}-{max(queries[:10]):g}",
            f"{min(queries[-10:]):g}-{max(queries[-10:]):g}",
        ),
        Row(
            "persist per save, median of 11, wall",
            ms(persist[0]),
            ms(persist[1]),
            times(persist[1] / persist[0]),
        ),
        Row(
            "persist per save, median of 11, CPU",
            ms(persist_cpu[0]),
            ms(persist_cpu[1]),
            times(persist_cpu[1] / persist_cpu[0]),
            "<= 1.20x",
            verdict(persist_cpu[1] / persist_cpu[0] <= 1.20),
        ),
        Row(
            "blocking per save, first/last tenth",
            ms(first),
            ms(last),
            times(last / first),
            "<= 1.20x",
            verdict(last / first <= 1.20),
        ),
        Row(
            "  the same in CPU time",
            ms(first_cpu),
            ms(last_cpu),
            times(last_cpu / first_cpu),
        ),
    ]
    return Section(
        f"Growth: one Checkpoint fit keeping all {kept} checkpoints",
        rows,
        columns=("at ~10 kept", f"at ~{kept} kept"),
    )


def section_c(pair: Pair, baseline: CopyBaseline, big_mb: int, repeats: int) -> Section:
    """(c) a large checkpoint saved three times; persistence against ``cp``."""
    rows = fit_rows(pair, None, small=False)
    size = baseline.size / MB
    ours = [
        n / MB / t
        for n, t in zip(
            pair.pooled("ours", "persist_bytes"), ours_persist(pair), strict=True
        )
    ]
    cp_rate = size / h.median(pair.pooled("cp", "persist"))
    settled_rate = size / h.median(baseline.cp)
    copy_rate = size / h.median(baseline.copyfile)
    plain_rate = size / h.median(pair.pooled("plain", "blocking"))
    rows += [
        Row("checkpoint file size", f"{size:.0f} MiB", f"{size:.0f} MiB"),
        Row("torch.save by Lightning, MB/s", f"{plain_rate:.0f}", ""),
        Row(
            "persist MB/s vs `cp` after save (left)",
            f"{cp_rate:.0f}",
            f"{h.median(ours):.0f}",
            times(h.median(ours) / cp_rate),
            ">= 0.80x",
            verdict(h.median(ours) >= 0.8 * cp_rate),
        ),
        Row("`cp` of a settled file, MB/s (left)", f"{settled_rate:.0f}", ""),
        Row("shutil.copyfile, settled, MB/s (left)", f"{copy_rate:.0f}", ""),
        Row(
            "lamindb hash_file (first+last 50 MB)",
            ms(h.median(baseline.lamin_hash)),
            "",
        ),
    ]
    title = f"(c) {big_mb} MiB checkpoint saved 3 times, keep all"
    return Section(f"{title} ({repeats} fits each, and {repeats} `cp` fits)", rows)


def section_imports(imports: ImportTimes, repeats: int) -> Section:
    """Import cost of the core on top of lightning, in fresh interpreters."""
    delta = h.median(imports.core_delta)
    base, both = h.median(imports.lightning_only), h.median(imports.with_core)
    loaded = sorted(imports.loaded)
    rows = [
        Row(
            "import lightning [+ core], median",
            sec(base),
            sec(both),
            times(both / base),
        ),
        Row("  difference of the medians (noisy)", "", ms(both - base)),
        Row(
            "core after lightning, same process",
            "",
            ms(delta),
            "",
            "< 50 ms",
            verdict(delta < 0.050),
        ),
        Row(
            "  then the first Checkpoint(), median",
            "",
            ms(h.median(imports.first_checkpoint)),
        ),
        Row(
            "backends imported by the core",
            "",
            ", ".join(loaded) or "none",
            "",
            "none",
            verdict(not {"lamindb", "wandb", "mlflow", "clearml"} & set(loaded)),
        ),
    ]
    added = ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in imports.packages[:8])
    notes = [
        f"-X importtime, self time the core adds per package: {added}",
        "the event models (pydantic) and the installed plugins load with the "
        "first Checkpoint(), not on import",
    ]
    return Section(
        f"Import ({repeats} fresh interpreters each)",
        rows,
        columns=("lightning", "lightning + core"),
        notes=notes,
    )


def section_breakdown(growth: h.SaveLog, bare: h.SaveLog, wal: h.SaveLog) -> Section:
    """Persistence of a tiny checkpoint against lamindb alone and faster SQLite.

    Wall time shows the disk waits, CPU time the work; the ratio is of wall.
    """
    ours = h.median(growth.persist)

    def row(label: str, log: h.SaveLog, attribute: str = "persist") -> Row:
        wall = h.median(getattr(log, attribute))
        cpu = h.median(getattr(log, f"{attribute}_cpu"))
        return Row(label, ms(wall), ms(cpu), times(wall / ours))

    rows = [
        row("Checkpoint persist, SQLite as created", growth),
        row("bare ln.Artifact(file, key).save()", bare),
        row("Checkpoint persist, WAL + sync=NORMAL", wal),
        row("  blocking per save, WAL + sync=NORMAL", wal, "blocking"),
    ]
    notes = [
        "SQLite as created by `lamin init`: journal_mode=delete, synchronous=FULL;",
        "the WAL rows are a what-if (measured last, they change the instance)",
    ]
    return Section(
        "Persistence of a tiny checkpoint, where the floor is (no target)",
        rows,
        columns=("wall, median", "CPU, median"),
        notes=notes,
    )


def build(
    header: Header,
    a: Pair,
    b: Pair,
    growth: h.SaveLog,
    c: Pair,
    baseline: CopyBaseline,
    imports: ImportTimes,
    breakdown: Section,
) -> Report:
    """Assemble every section of the report."""
    options = header.options
    repeats = options["repeats"]
    per_save = ("blocking", "blocking_cpu", "persist", "persist_cpu")
    raw: dict[str, Any] = {
        name: {
            "walls": pair.walls,
            **{
                f"{which}_{a}": pair.pooled(which, a)
                for which in pair.logs
                for a in per_save
            },
        }
        for name, pair in (("a", a), ("b", b), ("c", c))
    }
    raw["growth"] = {a: getattr(growth, a) for a in (*per_save, "persist_queries")}
    return Report(
        header,
        [
            section_a(a, options["steps_a"], repeats),
            section_b(b, options["steps_b"], repeats),
            section_growth(growth, options["kept"]),
            breakdown,
            section_c(c, baseline, options["big_mb"], len(c.walls["plain"])),
            section_imports(imports, options["import_repeats"]),
        ],
        raw,
    )


def render(report: Report) -> str:
    """The report as aligned plain text, ending with a list of verdicts."""
    head = report.header
    lines = [
        f"lamin-lightning checkpoint benchmark, {head.started}, {head.cpus} CPUs",
        head.versions,
        f"load average (1, 5, 15 min): {head.load}",
        f"LaminDB instance: {head.instance}; {head.artifacts} artifacts at the end",
        f"Checkpoint: {head.mode}; plugins disabled: {head.disabled}",
        "options: " + ", ".join(f"{k}={v}" for k, v in head.options.items()),
    ]
    for section in report.sections:
        lines += ["", section.title, *table(section)]
        lines += [f"  note: {note}" for note in section.notes]
    lines += ["", "Targets"]
    for section in report.sections:
        for row in section.rows:
            if row.verdict:
                label = section.title.split(" ")[0]
                lines.append(
                    f"  {row.verdict}  {label} {row.metric.strip()}: "
                    f"{row.ratio or row.right} (target {row.target})"
                )
    return "\n".join(lines)


def table(section: Section) -> list[str]:
    widths = (40, 18, 18, 8, 10)
    titles = ("metric", *section.columns, "ratio", "target", "")
    rows = [titles] + [dataclasses.astuple(row) for row in section.rows]
    return [
        "  "
        + "".join(
            str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=True)
        )
        + str(row[-1])
        for row in rows
    ]


def render_profile(
    profiler: cProfile.Profile, log: h.SaveLog, evicting: h.SaveLog
) -> str:
    """Where persistence spends its time, per save, and the SQL it sends.

    ``log`` holds the profiled saves; ``evicting`` a fit whose removals show
    the SQL of deleting an evicted checkpoint's artifact.
    """
    saves = max(1, len(log.persist))
    stats = pstats.Stats(profiler)
    lines = [
        "",
        f"Where a persisted save's time goes: cProfile of {saves} saves of a",
        "keep-all fit after the growth run, per save (profiling inflates times;",
        f"median persist time under the profiler {ms(h.median(log.persist))})",
    ]
    for function in ("persist", "lamin_lightning_persist_artifact"):
        lines.append(f"  direct callees of {function}:")
        lines += callee_lines(stats, function, saves)
    lines.append("  top functions by cumulative time:")
    entries = profile_entries(stats, saves)
    lines += [entry_line(e) for e in sorted(entries, key=lambda e: -e[0])[:20]]
    lines.append("  top functions by self time:")
    lines += [entry_line(e) for e in sorted(entries, key=lambda e: -e[1])[:12]]
    lines.append(f"SQL of one persisted save ({len(log.persist_sql[-1])} statements):")
    lines += sql_lines(log.persist_sql[-1])
    if evicting.delete_sql:
        removal = evicting.delete_sql[-1]
        lines.append(f"SQL of one eviction (a) ({len(removal)} statements):")
        lines += sql_lines(removal)
    return "\n".join(lines)


Entry = tuple[float, float, float, str]


def profile_entries(stats: pstats.Stats, saves: int) -> list[Entry]:
    """(cumulative, self, calls) per save and a label for every function."""
    entries = []
    for key, value in stats.stats.items():  # type: ignore[attr-defined]
        label = frame_label(key)
        if label is not None:
            entries.append(
                (value[3] / saves, value[2] / saves, value[1] / saves, label)
            )
    return entries


def callee_lines(stats: pstats.Stats, function: str, saves: int) -> list[str]:
    """The functions ``function`` calls directly, by cumulative time."""
    stats.calc_callees()
    keys = [
        key
        for key in stats.stats  # type: ignore[attr-defined]
        if key[2] == function and "lamin_lightning" in key[0]
    ]
    if not keys:
        return ["    (not found)"]
    callees = stats.all_callees[keys[0]]  # type: ignore[attr-defined]
    entries = []
    for key, value in callees.items():
        label = frame_label(key) or key[2]
        entries.append((value[3] / saves, value[2] / saves, value[1] / saves, label))
    entries.sort(key=lambda e: -e[0])
    return [entry_line(e, indent=4) for e in entries[:8]]


def entry_line(entry: Entry, indent: int = 4) -> str:
    cumulative, own, calls, label = entry
    numbers = f"{ms(cumulative):>9} cum {ms(own):>8} self {calls:5.1f}x"
    return f"{' ' * indent}{numbers}  {label}"


def frame_label(key: tuple[str, int, str]) -> str | None:
    """``path:line(function)``, or ``None`` for frames of the benchmark itself."""
    filename, line, function = key
    if filename == "~":
        return re.sub(r" at 0x[0-9a-f]+", "", function)
    if "_harness.py" in filename or filename.endswith("contextlib.py"):
        return None
    if "site-packages/" in filename:
        filename = filename.split("site-packages/", 1)[1]
    else:
        filename = re.sub(r".*/lib/python3\.\d+/", "", filename)
        project = str(Path(__file__).resolve().parents[1]) + "/"
        filename = filename.removeprefix(project)
    return f"{filename}:{line}({function})"


def sql_lines(statements: list[str]) -> list[str]:
    return [f"  {n:3} x {what}" for what, n in sql_summary(statements).items()]


def sql_summary(statements: list[str]) -> dict[str, int]:
    """Count statements by verb and first table named."""
    counts: Counter[str] = Counter()
    for sql in statements:
        verb = sql.split(None, 1)[0].upper() if sql.strip() else "?"
        table = re.search(r'(?:FROM|INTO|UPDATE)\s+"(\w+)"', sql)
        counts[f"{verb} {table.group(1) if table else ''}".strip()] += 1
    return dict(counts.most_common())
