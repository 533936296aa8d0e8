"""A tracked fit that is killed with SIGKILL right after its Nth checkpoint.

Run by ``test_kill.py`` as ``python -m tests.reliability.killed_fit ROOT N``
from the repository root, in the test session's LaminDB instance. Prints the
tracked run's UID first.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lamin_lightning_core as ll
from tests.helpers import fit

REGISTRARS = ["wandb", "mlflow", "clearml", "recorder"]


class Checkpoint(ll.Checkpoint):
    """Kills its own process once Lightning wrote the ``kill_at``-th file.

    Named like the callback the resumed fit uses: Lightning restores callback
    state by class name.
    """

    def __init__(self, kill_at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill_at = kill_at
        self.saves = 0

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saves += 1
        if self.saves == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(root: Path, kill_at: int) -> None:
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe

    mark_local_instance_offline_safe()  # ln.track() asks the hub otherwise
    import lamindb as ln

    ln.track()
    print("RUN", ln.context.run.uid, flush=True)
    checkpoint = Checkpoint(
        kill_at,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        dirpath=root / "ckpts",
        disable_plugins=REGISTRARS,
    )
    fit([checkpoint], root, steps=kill_at + 2, scores=[9, 8, 7, 6, 5, 4, 3, 2])


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
