"""One side of the PostgreSQL concurrency test, run by ``test_postgres.py``.

``python tests/reliability/pg_fit.py fit BARRIER N`` runs a tracked fit with
``dirpath="ckpts"`` in the working directory (one per "machine"), after
waiting until ``N`` processes reached ``BARRIER`` (a folder), so that
``ln.track()``, ``save_lightning_features()`` and every save overlap. It
prints ``RUN <uid>`` once tracked. ``python tests/reliability/pg_fit.py check UID
...`` prints, as JSON, what LaminDB holds for those runs. Both run in the
instance that ``LAMIN_SETTINGS_DIR`` and ``LAMIN_CURRENT_INSTANCE`` name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a file, tests.helpers is importable

REGISTRARS = ["wandb", "mlflow", "clearml", "recorder"]
SCORES = [5.0, 4.0, 6.0, 3.0, 7.0, 2.0]
"""With ``mode=min`` and top 2: steps 1, 2, 4 and 6 are saved, 1 and 2 evicted."""


def wait_for_all(barrier: Path, count: int, timeout: float = 120) -> None:
    """Announce this process in ``barrier`` and wait for ``count`` of them."""
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} processes reached {barrier}")
        time.sleep(0.02)


def fit(barrier: Path, count: int) -> None:
    import lamin_lightning_core as ll
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe
    from tests.helpers import fit as run_fit

    mark_local_instance_offline_safe()  # ln.track() asks the hub otherwise
    import lamindb as ln

    wait_for_all(barrier, count)
    ln.track()
    print("RUN", ln.context.run.uid, flush=True)
    ll.save_lightning_features()
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        dirpath="ckpts",
        disable_plugins=REGISTRARS,
        strict=True,  # a failed save fails the fit, with its traceback
    )
    run_fit([checkpoint], Path.cwd(), steps=len(SCORES), scores=SCORES)
    ln.finish()


def check(run_uids: list[str]) -> None:
    from lamin_lightning_adapters._lamindb_features import DTYPES, FEATURE_TYPE
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe

    mark_local_instance_offline_safe()
    import lamindb as ln
    from lamindb.models import ArtifactJsonValue

    runs: dict[str, Any] = {}
    for uid in run_uids:
        run = ln.Run.get(uid=uid)
        artifacts = ln.Artifact.filter(key__contains=uid, kind="model")
        runs[uid] = {
            "artifacts": [
                {"key": a.key, "run": a.run.uid if a.run else None} for a in artifacts
            ],
            "outputs": sorted(a.key for a in run.output_artifacts.filter(kind="model")),
            "span": [run.started_at.timestamp(), run.finished_at.timestamp()],
        }
        features: dict[str, dict[str, Any]] = defaultdict(dict)
        rows = ArtifactJsonValue.objects.filter(
            artifact__key__contains=uid, jsonvalue__feature__type__name=FEATURE_TYPE
        ).values_list("artifact__key", "jsonvalue__feature__name", "jsonvalue__value")
        for key, name, value in rows:
            features[key].setdefault(name, []).append(value)
        runs[uid]["features"] = features
    feature_names = ln.Feature.filter(type__name=FEATURE_TYPE).values_list(
        "name", flat=True
    )
    report = {
        "runs": runs,
        "feature_types": ln.Feature.filter(name=FEATURE_TYPE, is_type=True).count(),
        "features": sorted(feature_names),
        "expected_features": sorted(DTYPES),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "fit":
        fit(Path(args[0]), int(args[1]))
    else:
        check(args)
