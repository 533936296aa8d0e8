from __future__ import annotations

from pathlib import Path

import pytest

from lamin_lightning_core._keys import (
    LoggerLayout,
    base_prefix,
    checkpoint_key,
    checkpoint_key_prefix,
    config_key,
    dirpath_segment,
    hparams_key,
    join_key,
)

TB = LoggerLayout(save_dir="/home/me/project/logs", name="lightning_logs", version=3)
UID = "2r5pIRnK7z0q"
CWD = Path("/home/me/project")


@pytest.mark.parametrize(
    ("dirpath", "logger", "run_uid", "uid_is_version", "expected"),
    [
        ("ckpts", TB, UID, True, f"ckpts/{UID}"),
        ("ckpts", None, UID, True, f"ckpts/{UID}"),
        (None, TB, UID, True, f"logs/lightning_logs/{UID}"),
        (None, None, UID, True, UID),
        ("ckpts", TB, None, True, "ckpts"),
        (None, TB, None, True, "logs/lightning_logs/version_3"),
        (None, None, None, True, ""),
        ("ckpts", TB, UID, False, "ckpts"),
        (None, TB, UID, False, "logs/lightning_logs/version_3"),
        (None, None, UID, False, ""),
    ],
    ids=[
        "dirpath+logger+uid",
        "dirpath+uid",
        "logger+uid",
        "nothing+uid",
        "dirpath+logger",
        "logger",
        "nothing",
        "dirpath+logger+uid-opt-out",
        "logger+uid-opt-out",
        "nothing+uid-opt-out",
    ],
)
def test_base_prefix_follows_the_spec_table(
    dirpath: str | None,
    logger: LoggerLayout | None,
    run_uid: str | None,
    uid_is_version: bool,
    expected: str,
) -> None:
    prefix = base_prefix(
        dirpath=dirpath,
        logger=logger,
        run_uid=run_uid,
        run_uid_is_version=uid_is_version,
        cwd=CWD,
    )
    assert prefix == expected


@pytest.mark.parametrize(
    ("base", "ckpt", "hparams", "config"),
    [
        (
            f"logs/lightning_logs/{UID}",
            f"logs/lightning_logs/{UID}/checkpoints/epoch=0-step=100.ckpt",
            f"logs/lightning_logs/{UID}/checkpoints/hparams.yaml",
            f"logs/lightning_logs/{UID}/config.yaml",
        ),
        (
            f"ckpts/{UID}",
            f"ckpts/{UID}/checkpoints/epoch=0-step=100.ckpt",
            f"ckpts/{UID}/checkpoints/hparams.yaml",
            f"ckpts/{UID}/config.yaml",
        ),
        (
            UID,
            f"{UID}/checkpoints/epoch=0-step=100.ckpt",
            f"{UID}/checkpoints/hparams.yaml",
            f"{UID}/config.yaml",
        ),
        (
            "",
            "checkpoints/epoch=0-step=100.ckpt",
            "checkpoints/hparams.yaml",
            "config.yaml",
        ),
    ],
    ids=["logger", "dirpath", "run-uid-only", "bare"],
)
def test_keys_of_each_kind(base: str, ckpt: str, hparams: str, config: str) -> None:
    assert checkpoint_key(base, "epoch=0-step=100.ckpt") == ckpt
    assert hparams_key(base) == hparams
    assert config_key(base) == config
    assert checkpoint_key_prefix(base) == ckpt.rsplit("/", 1)[0]


def test_string_logger_version_is_used_verbatim() -> None:
    wandb_like = LoggerLayout(save_dir=None, name="proj", version="a1b2c3")
    assert base_prefix(dirpath=None, logger=wandb_like, run_uid=None) == "proj/a1b2c3"


@pytest.mark.parametrize(
    ("dirpath", "expected"),
    [
        ("./ckpts/", "ckpts"),
        ("/home/me/project/out/ckpts", "out/ckpts"),
        ("/data/ckpts", "data/ckpts"),
        ("../elsewhere", "home/me/elsewhere"),
        ("out/../../up", "home/me/up"),
        ("a\\b", "a/b"),
    ],
    ids=[
        "dot",
        "absolute-inside-cwd",
        "absolute-outside",
        "climb",
        "hidden-climb",
        "backslash",
    ],
)
def test_dirpath_becomes_a_safe_relative_segment(dirpath: str, expected: str) -> None:
    assert dirpath_segment(dirpath, cwd=CWD) == expected


def test_joined_keys_never_climb_or_start_with_a_slash() -> None:
    key = join_key("/abs", "..", "a/../b", "./c", "", None, "d//e")
    assert key == "abs/a/b/c/d/e"
    assert not key.startswith("/")
    assert ".." not in key.split("/")


def test_metric_name_with_a_slash_in_the_filename_stays_below_the_prefix() -> None:
    key = checkpoint_key("logs/x/uid", "epoch=0-val/loss=0.5.ckpt")
    assert key == "logs/x/uid/checkpoints/epoch=0-val/loss=0.5.ckpt"
