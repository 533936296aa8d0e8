"""Artifact-key derivation: pure functions, no Lightning objects.

The base prefix follows the spec's priority:

====================  ===========================================
scenario              base prefix
====================  ===========================================
``dirpath`` set       ``{dirpath}/{run_uid}``
logger, no dirpath    ``{save_dir_basename}/{name}/{run_uid}``
neither               ``{run_uid}``
====================  ===========================================

Without a run UID (no tracked run, or ``run_uid_is_version=False``) the
logger's own version (``version_0``) takes its place, or the segment is
omitted. Checkpoints and ``hparams.yaml`` live under
``{base}/checkpoints/``, the config directly under ``{base}/``.

Every key is a relative POSIX path: no leading ``/``, no ``.`` or ``..``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final, Literal, get_args

CHECKPOINTS_DIR = "checkpoints"
HPARAMS_FILENAME = "hparams.yaml"

ArtifactKind = Literal["checkpoint", "config", "hparams"]
ARTIFACT_KINDS: Final[tuple[str, ...]] = get_args(ArtifactKind)


def check_kind(kind: str) -> ArtifactKind:
    """Return ``kind`` if it is a known artifact kind.

    Raises:
        ValueError: naming the unknown kind and the accepted ones.
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(
            f"Unknown artifact kind {kind!r}: expected one of "
            f"{', '.join(map(repr, ARTIFACT_KINDS))}."
        )
    return kind  # type: ignore[return-value]


@dataclass(frozen=True)
class LoggerLayout:
    """Where the trainer's first logger writes: ``{save_dir}/{name}/{version}``."""

    save_dir: str | None
    name: str | None
    version: str | int | None


def join_key(*segments: str | None) -> str:
    """Join segments into a safe relative POSIX key.

    Separators inside a segment split it further; empty, ``.`` and ``..``
    parts are dropped, so a segment can never climb out of the prefix.
    """
    parts: list[str] = []
    for segment in segments:
        if not segment:
            continue
        for part in segment.replace("\\", "/").split("/"):
            if part and part not in (".", ".."):
                parts.append(part)
    return "/".join(parts)


def dirpath_segment(dirpath: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Turn a user's ``dirpath`` into a relative key segment.

    A relative ``dirpath`` is kept as written (normalised). An absolute one,
    or one that climbs with ``..``, is expressed relative to ``cwd`` when it
    lies inside it, otherwise as the absolute path without its anchor
    (``/data/ckpts`` becomes ``data/ckpts``).
    """
    path = PurePath(os.path.expanduser(os.fspath(dirpath)))
    if not path.is_absolute() and ".." not in path.parts:
        return join_key(path.as_posix())
    cwd = cwd or Path.cwd()
    absolute = Path(os.path.normpath(cwd / path))
    try:
        return join_key(absolute.relative_to(cwd).as_posix())
    except ValueError:
        return join_key(*absolute.parts[1:])


def version_segment(version: str | int | None) -> str | None:
    """Name a logger version the way Lightning names its directory."""
    if version is None or version == "":
        return None
    return version if isinstance(version, str) else f"version_{version}"


def base_prefix(
    *,
    dirpath: str | os.PathLike[str] | None,
    logger: LoggerLayout | None,
    run_uid: str | None,
    run_uid_is_version: bool = True,
    cwd: Path | None = None,
) -> str:
    """Derive the base key prefix shared by a callback's artifacts.

    Args:
        dirpath: the ``dirpath`` the user passed to the callback, if any.
        logger: the layout of the trainer's first logger, if any.
        run_uid: the tracked run's UID, if any.
        run_uid_is_version: use the run UID as the version segment.
        cwd: directory that relative keys are taken against (tests).

    Returns:
        The prefix, possibly empty (no dirpath, no logger, no run UID).
    """
    uid = run_uid if run_uid_is_version else None
    if dirpath is not None:
        return join_key(dirpath_segment(dirpath, cwd), uid)
    if logger is not None:
        save_dir = Path(logger.save_dir).name if logger.save_dir else None
        version = uid or version_segment(logger.version)
        return join_key(save_dir, logger.name, version)
    return join_key(uid)


def checkpoint_key_prefix(base: str) -> str:
    """``{base}/checkpoints``, or ``checkpoints`` for an empty base."""
    return join_key(base, CHECKPOINTS_DIR)


def checkpoint_key(base: str, relative_file: str) -> str:
    """Key of a checkpoint file, given its path relative to ``dirpath``."""
    return join_key(checkpoint_key_prefix(base), relative_file)


def hparams_key(base: str) -> str:
    """Key of Lightning's ``hparams.yaml``: ``{base}/checkpoints/hparams.yaml``."""
    return join_key(checkpoint_key_prefix(base), HPARAMS_FILENAME)


def config_key(base: str, filename: str = "config.yaml") -> str:
    """Key of the LightningCLI config: ``{base}/{filename}``."""
    return join_key(base, Path(filename).name)
