"""Find persisted checkpoints in LaminDB with a fixed number of queries."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from lamin_lightning_adapters._lamindb_features import FEATURE_TYPE
from lamin_lightning_core._events import CheckpointRecord

if TYPE_CHECKING:
    from lamin_lightning_core._events import CheckpointQuery

_EPOCH = re.compile(r"epoch[= ](\d+)")
_STEP = re.compile(r"step[= ](\d+)")
_AUTO_FIELDS = ("score", "mode", "model_rank", "is_best_model", "is_last_model")


def find_checkpoints(ln: Any, query: CheckpointQuery) -> list[CheckpointRecord]:
    """Checkpoint artifacts matching ``query``, oldest first, with their values."""
    from lamindb.models import ArtifactJsonValue

    artifacts = ln.Artifact.filter(kind="model", key__contains="checkpoints/")
    run_uid = query.run_uid
    if run_uid is None and query.latest_run:
        run_uid = (
            artifacts.filter(run__isnull=False)
            .order_by("-created_at")
            .values_list("run__uid", flat=True)
            .first()
        )
        if run_uid is None:
            return []
    if run_uid is not None:
        artifacts = artifacts.filter(run__uid=run_uid)
    if query.key_prefix:
        artifacts = artifacts.filter(key__startswith=query.key_prefix.rstrip("/") + "/")
    if query.features:
        artifacts = artifacts.filter(**query.features)
    found = list(artifacts.select_related("run").order_by("created_at", "id"))
    rows = ArtifactJsonValue.objects.filter(
        artifact_id__in=[a.id for a in found]
    ).values_list(
        "artifact_id",
        "jsonvalue__feature__name",
        "jsonvalue__feature__type__name",
        "jsonvalue__value",
    )
    auto: dict[int, dict[str, Any]] = defaultdict(dict)
    user: dict[int, dict[str, Any]] = defaultdict(dict)
    for artifact_id, name, type_name, value in rows:
        (auto if type_name == FEATURE_TYPE else user)[artifact_id][name] = value
    return [_record(a, auto[a.id], user[a.id]) for a in found]


def _record(
    artifact: Any, auto: dict[str, Any], user: dict[str, Any]
) -> CheckpointRecord:
    from lamin_lightning_adapters.lamindb import storage_uri

    # Recorded at save time in the description; older artifacts: the key.
    described = artifact.description or ""
    epoch = _EPOCH.search(described) or _EPOCH.search(artifact.key)
    step = _STEP.search(described) or _STEP.search(artifact.key)
    return CheckpointRecord(
        key=artifact.key,
        artifact_uid=artifact.uid,
        run_uid=artifact.run.uid if artifact.run is not None else None,
        storage_uri=storage_uri(artifact),
        size=artifact.size,
        created_at=artifact.created_at,
        epoch=int(epoch.group(1)) if epoch else None,
        global_step=int(step.group(1)) if step else None,
        features=user,
        artifact=artifact,
        **{name: auto.get(name) for name in _AUTO_FIELDS},
    )


def fetch_checkpoint(ln: Any, record: CheckpointRecord) -> str:
    """A local path of the checkpoint; tracked as an input of the current run."""
    artifact: Any = record.artifact
    if artifact is None:
        artifact = ln.Artifact.get(uid=record.artifact_uid)
    return str(artifact.cache())
