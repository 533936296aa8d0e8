"""Find the code blocks of the docs and run them the way a reader would.

The conventions, for whoever writes a page:

* A ``python`` block runs, in page order, in one namespace per page. It is
  executed from a file named after the page and line, because ``ln.track()``
  names the LaminDB transform after the file that calls it.
* A ``pycon`` block is a doctest in the same namespace. Its expected output
  may use ``...`` for anything that varies; run UIDs are written as the
  placeholders in :data:`RUN_UID_PLACEHOLDERS`, first run first.
* A block with ``title="name"`` is a file: it is written to the working
  directory before the page runs. A python file runs only through a ``bash``
  line ``python name args...`` on the same page.
* ``{ .python .no-run }`` marks a fragment that cannot run on its own; it is
  compiled, not executed.
* ``{ .python data-warns="PluginDeliveryWarning" }`` says the block emits
  that ``lamin_lightning_core`` warning; the test checks that it does.
"""

from __future__ import annotations

import doctest
import os
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import lamin_lightning_core as ll

DOCS = Path(__file__).resolve().parents[2] / "docs"
RUN_UID_PLACEHOLDERS = ("2r5pIRnK7z0qV4Yb", "8Hq1cTzW0mEeXs3L")
PYTHON = ("python", "py")
SHELL = ("bash", "sh", "console", "shell")

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<header>[^\n`]*)\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_COMMAND = re.compile(r"^(?:\$ )?python (?P<script>\S+\.py)(?P<args>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int
    lang: str
    code: str
    classes: tuple[str, ...] = ()
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str | None:
        return self.attrs.get("title")

    @property
    def runs(self) -> bool:
        return "no-run" not in self.classes and self.title is None

    def __str__(self) -> str:
        return f"docs/{self.page}:{self.line} ({self.lang})"


def pages() -> list[str]:
    """Every page of the docs, relative to ``docs/``."""
    return sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of ``page``, in order, dedented."""
    text = (DOCS / page).read_text()
    found = []
    for match in _FENCE.finditer(text):
        lang, classes, attrs = _parse_header(match["header"])
        indent = len(match["indent"])
        code = "".join(line[indent:] for line in match["body"].splitlines(True))
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, lang, code, classes, attrs))
    return found


def _parse_header(header: str) -> tuple[str, tuple[str, ...], dict[str, str]]:
    header = header.strip()
    braced = header.startswith("{") and header.endswith("}")
    tokens = shlex.split(header[1:-1] if braced else header)
    classes = [token[1:] for token in tokens if token.startswith(".")]
    attrs = dict(token.split("=", 1) for token in tokens if "=" in token)
    if braced:
        lang = classes.pop(0) if classes else ""
    else:
        lang = tokens[0] if tokens and "=" not in tokens[0] else ""
    return lang, tuple(classes), attrs


def is_runnable(page: str) -> bool:
    """Whether ``page`` has anything for :func:`run_page` to execute."""
    return any(
        block.lang in (*PYTHON, "pycon") or block.lang in SHELL
        for block in blocks(page)
    )


class RunUidChecker(doctest.OutputChecker):
    """Compares outputs with the real run UIDs replaced by placeholders.

    Args:
        run_uids: returns the UIDs of the runs the page created, oldest first.
    """

    def __init__(self, run_uids: Callable[[], list[str]]) -> None:
        self.run_uids = run_uids

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(want, self.normalise(got), optionflags)

    def output_difference(
        self, example: doctest.Example, got: str, optionflags: int
    ) -> str:
        return super().output_difference(example, self.normalise(got), optionflags)

    def normalise(self, got: str) -> str:
        uids = self.run_uids()
        assert len(uids) <= len(RUN_UID_PLACEHOLDERS), (
            f"the page created {len(uids)} runs: add placeholders to "
            "RUN_UID_PLACEHOLDERS in tests/docs/examples.py"
        )
        placeholders = RUN_UID_PLACEHOLDERS[: len(uids)]
        for uid, placeholder in zip(uids, placeholders, strict=True):
            got = got.replace(uid, placeholder)
        return got


def run_page(page: str, cwd: Path, checker: doctest.OutputChecker) -> dict:
    """Write the page's files into ``cwd``, then run its blocks in order.

    Returns:
        The namespace the page's python and pycon blocks shared.
    """
    page_blocks = blocks(page)
    files = _write_files(page_blocks, cwd)
    namespace: dict = {"__name__": "__main__"}
    for block in page_blocks:
        if block.lang in PYTHON and "no-run" in block.classes:
            compile(block.code, str(block), "exec")
        elif block.lang in PYTHON and block.runs:
            with _expected_warnings(block):
                _exec(block, namespace, cwd)
        elif block.lang == "pycon":
            _doctest(block, namespace, checker)
        elif block.lang in SHELL:
            _run_commands(block, files, cwd)
    return namespace


def check_no_delivery_failures(namespace: dict) -> None:
    """Fail if a ``Checkpoint`` of the page kept a failed delivery."""
    for name, value in namespace.items():
        if isinstance(value, ll.Checkpoint) and value.delivery_failures:
            pytest.fail(f"{name}.delivery_failures: {value.delivery_failures}")


def _write_files(page_blocks: list[Block], cwd: Path) -> set[str]:
    written = set()
    for block in page_blocks:
        if block.title is None or "no-run" in block.classes:
            continue
        path = cwd / block.title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
        written.add(block.title)
    return written


def _expected_warnings(block: Block) -> AbstractContextManager[object]:
    name = block.attrs.get("data-warns")
    if name is None:
        return nullcontext()
    category = getattr(ll, name)
    assert issubclass(category, Warning), f"{block}: {name} is no warning class"
    return pytest.warns(category)


def _exec(block: Block, namespace: dict, cwd: Path) -> None:
    stem = block.page.removesuffix(".md").replace("/", "-")
    path = cwd / f"{stem}_{block.line}.py"
    path.write_text(block.code)
    saved = sys.argv
    sys.argv = [path.name]  # as if run with `python <file>`: no pytest options
    try:
        exec(compile(block.code, str(path), "exec"), namespace)
    finally:
        sys.argv = saved


def _doctest(block: Block, namespace: dict, checker: doctest.OutputChecker) -> None:
    test = doctest.DocTestParser().get_doctest(
        block.code, namespace, str(block), str(DOCS / block.page), block.line
    )
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(checker=checker, optionflags=flags)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    namespace.update(test.globs)  # DocTest ran on a copy; later blocks see it
    if runner.failures:
        pytest.fail("".join(report), pytrace=False)


def _run_commands(block: Block, files: set[str], cwd: Path) -> None:
    for line in block.code.splitlines():
        match = _COMMAND.match(line.strip())
        if match is None or match["script"] not in files:
            continue
        argv = [match["script"], *shlex.split(match["args"])]
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(str(cwd / match["script"]), run_name="__main__")
        finally:
            sys.argv = saved


def main(argv: list[str]) -> int:
    """Run one page in this process: ``python -m tests.docs.examples PAGE CWD``.

    For pages whose backend keeps per-process state that must not leak into
    the test session (ClearML reads its configuration once per process). The
    LaminDB instance comes from the environment of the calling test.
    """
    page, cwd = argv[0], Path(argv[1])
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    warnings.simplefilter("error", ll.LaminLightningWarning)
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe
    from tests.docs import standins

    mark_local_instance_offline_safe()
    import lamindb as ln
    import torch

    sys.modules["my_project"] = sys.modules["my_model_registry"] = standins
    torch.manual_seed(0)
    newest = ln.Run.filter().order_by("-id").first()
    since = newest.id if newest is not None else 0

    def run_uids() -> list[str]:
        return [run.uid for run in ln.Run.filter(id__gt=since).order_by("id")]

    try:
        namespace = run_page(page, cwd, RunUidChecker(run_uids))
        check_no_delivery_failures(namespace)
    except pytest.fail.Exception as failure:
        print(failure, file=sys.stderr)
        return 1
    finally:
        if ln.context.run is not None:
            ln.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
