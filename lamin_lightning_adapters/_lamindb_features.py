"""LaminDB features of runs and checkpoints, kept cheap as checkpoints pile up.

Run-level values are written once per fit with lamindb's ``features`` API.
Per checkpoint, the values of the new artifact are linked in one bulk insert,
and the rank and flags of the other checkpoints are moved in one ``UPDATE``:
a save costs the same number of queries with 10 or 500 kept checkpoints. We
write lamindb's own ``ArtifactJsonValue`` link rows for that, because
``artifact.features.set_values`` on every kept artifact is what made a
300-checkpoint fit take minutes (see issue 3); values are the same
``JsonValue`` rows that lamindb's API creates, so lamindb reads and queries
them as usual (``ln.Artifact.filter(is_best_model=True)``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lamin_lightning_core._annotations import AUTO_ARTIFACT_FEATURES, AUTO_RUN_FEATURES
from lamin_lightning_core._errors import LaminLightningError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from lamin_lightning_core._events import (
        CheckpointRank,
        FeatureValue,
        FitStartedEvent,
    )

log = logging.getLogger(__name__)

FEATURE_TYPE = "lamin_lightning"
"""The feature type grouping the auto-features, apart from users' features."""

DTYPES: dict[str, type] = {
    "is_best_model": bool,
    "is_last_model": bool,
    "score": float,
    "model_rank": int,
    "save_weights_only": bool,
    "monitor": str,
    "mode": str,
    "logger_name": str,
    "logger_version": str,
    "max_epochs": int,
    "max_steps": int,
    "precision": str,
    "accumulate_grad_batches": int,
    "gradient_clip_val": float,
    # where registrars mirrored the run (lamin_lightning_link_backend_runs)
    **{
        f"{system}_{field}": str
        for system in ("wandb", "mlflow", "clearml")
        for field in ("run_id", "run_url")
    },
}
_PY_DTYPES = {bool: "bool", int: "int", float: "float", str: "str"}
_RANK_FEATURES = ("model_rank", "is_best_model", "is_last_model")


def save_lightning_features() -> None:
    """Create the auto-features under the ``lamin_lightning`` feature type.

    Idempotent, and safe from two processes at once: lamindb has no unique
    constraint on a feature's name and type, so creation runs under a lock
    held across processes (an advisory lock on PostgreSQL, a file lock next
    to a SQLite database).
    """
    import lamindb as ln

    with _instance_lock(ln):
        feature_type = ln.Feature.filter(name=FEATURE_TYPE, is_type=True).first()
        if feature_type is None:
            feature_type = ln.Feature(name=FEATURE_TYPE, is_type=True).save()
        existing = set(
            ln.Feature.filter(type=feature_type).values_list("name", flat=True)
        )
        for name, dtype in DTYPES.items():
            if name not in existing:
                ln.Feature(name=name, dtype=dtype, type=feature_type).save()


@contextmanager
def _instance_lock(ln: Any) -> Iterator[None]:
    from django.db import connection, transaction

    if connection.vendor == "postgresql":
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
            yield
        return
    from filelock import FileLock

    database = ln.setup.settings.instance.db.removeprefix("sqlite:///")
    with FileLock(f"{database}.lamin-lightning.lock", timeout=60):
        yield


_LOCK_ID = 0x4C4C_4645  # "LLFE": lamin-lightning feature creation


class FeatureWriter:
    """Annotations of one callback's fit: checked once, then written per save.

    Args:
        ln: the ``lamindb`` module.
        event: the fit's start, with the user's feature names and values.
        run: the tracked run, or ``None``.

    Raises:
        LaminLightningError: listing every missing feature, or a value whose
            type does not match its feature's dtype, or run features without a
            tracked run.
    """

    def __init__(self, ln: Any, event: FitStartedEvent | None, run: Any) -> None:
        from lamindb.models import ArtifactJsonValue, JsonValue

        self._links = ArtifactJsonValue.objects
        self._json_value = JsonValue
        self.auto = {
            feature.name: feature
            for feature in ln.Feature.filter(
                type__name=FEATURE_TYPE, type__is_type=True
            )
        }
        self.user: dict[str, Any] = {}
        self._value_ids: dict[tuple[int, str], int] = {}
        self._link_values: dict[tuple[int, int], int] = {}
        self._artifact_ids: dict[str, int] = {}
        self._unloaded: set[int] = set()
        if event is not None:
            self.user = self._user_features(ln, event)
            self._annotate_run(ln, event, run)

    @classmethod
    def for_replay(cls, ln: Any, names: Iterable[str]) -> FeatureWriter:
        """A writer for saves that a replay persists after their fit ended.

        The fit checked its features and annotated its run already; features
        deleted since are left out of the annotations.
        """
        writer = cls(ln, None, None)
        writer.user = writer._features_named(ln, names)
        return writer

    def _user_features(self, ln: Any, event: FitStartedEvent) -> dict[str, Any]:
        wanted = {**event.run_features, **event.artifact_features}
        found = self._features_named(ln, wanted)
        missing = sorted(set(wanted) - set(found))
        if missing:
            examples = "; ".join(_creation_hint(name, wanted[name]) for name in missing)
            raise LaminLightningError(
                f"Checkpoint(features=...) names feature(s) that don't exist in "
                f"LaminDB: {', '.join(missing)}. Create them once before training, "
                f"e.g. {examples}"
            )
        for name, value in wanted.items():
            _check_dtype(found[name], value)
        return found

    def _features_named(self, ln: Any, names: Iterable[str]) -> dict[str, Any]:
        features = ln.Feature.filter(name__in=list(names), is_type=False)
        return {f.name: f for f in features if f.id not in self._auto_ids()}

    def _auto_ids(self) -> set[int]:
        return {feature.id for feature in self.auto.values()}

    def _annotate_run(self, ln: Any, event: FitStartedEvent, run: Any) -> None:
        if run is None:
            if event.run_features:
                raise LaminLightningError(
                    "features['run'] annotates the tracked run, but no run is "
                    "tracked: call ln.track() before trainer.fit()."
                )
            return
        values: dict[Any, FeatureValue] = {}
        hparam_features = self._features_named(ln, event.hyperparameters)
        for name, value in event.hyperparameters.items():
            if name in hparam_features:
                values[hparam_features[name]] = value
        for name in AUTO_RUN_FEATURES:
            if name in self.auto:
                values[self.auto[name]] = event.trainer_config.get(name)
        for name, value in event.run_features.items():
            values[self.user[name]] = value
        values = {
            feature: value for feature, value in values.items() if value is not None
        }
        if values:
            run.features.add_values(values)

    def annotate(
        self,
        artifact: Any,
        key: str,
        features: Mapping[str, FeatureValue],
        auto_features: Mapping[str, FeatureValue],
    ) -> None:
        """Link the values of a new checkpoint artifact (one bulk insert)."""
        self._artifact_ids[key] = artifact.id
        pairs = [(self.user[n], v) for n, v in features.items() if n in self.user]
        pairs += [
            (self.auto[name], auto_features[name])
            for name in AUTO_ARTIFACT_FEATURES
            if name in self.auto and name in auto_features
        ]
        links = []
        for feature, value in pairs:
            if value is None:
                continue
            value_id = self._value_id(feature, value)
            self._link_values[(artifact.id, feature.id)] = value_id
            links.append(
                self._links.model(artifact_id=artifact.id, jsonvalue_id=value_id)
            )
        self._links.bulk_create(links)

    def rerank(self, ranking: Mapping[str, CheckpointRank]) -> None:
        """Move rank and flags of other checkpoints: one UPDATE, one INSERT."""
        features = [self.auto[name] for name in _RANK_FEATURES if name in self.auto]
        if not ranking or not features:
            return
        ids = self._ids_of(ranking)
        self._load_links(ids.values(), features)
        updates: list[tuple[int, int, int]] = []
        inserts = []
        for key, standing in ranking.items():
            artifact_id = ids.get(key)
            if artifact_id is None:
                continue
            values = standing.model_dump()
            for feature in features:
                value_id = self._value_id(feature, values[feature.name])
                old = self._link_values.get((artifact_id, feature.id))
                if old == value_id:
                    continue
                self._link_values[(artifact_id, feature.id)] = value_id
                if old is None:
                    link = self._links.model(
                        artifact_id=artifact_id, jsonvalue_id=value_id
                    )
                    inserts.append(link)
                else:
                    updates.append((artifact_id, old, value_id))
        self._apply(updates, inserts)

    def forget(self, key: str) -> None:
        """Drop caches of a deleted artifact (its links went with it)."""
        artifact_id = self._artifact_ids.pop(key, None)
        if artifact_id is not None:
            for pair in [p for p in self._link_values if p[0] == artifact_id]:
                del self._link_values[pair]

    def _apply(self, updates: list[tuple[int, int, int]], inserts: list[Any]) -> None:
        from django.db.models import Case, IntegerField, Q, Value, When

        if updates:
            match = Q()
            cases = []
            for artifact_id, old, new in updates:
                match |= Q(artifact_id=artifact_id, jsonvalue_id=old)
                cases.append(
                    When(artifact_id=artifact_id, jsonvalue_id=old, then=Value(new))
                )
            self._links.filter(match).update(
                jsonvalue_id=Case(*cases, output_field=IntegerField())
            )
        if inserts:
            self._links.bulk_create(inserts)

    def _ids_of(self, ranking: Mapping[str, CheckpointRank]) -> dict[str, int]:
        missing = [key for key in ranking if key not in self._artifact_ids]
        if missing:  # artifacts of an earlier process (resume)
            from lamindb import Artifact

            rows = Artifact.filter(key__in=missing, is_latest=True).values_list(
                "id", "key"
            )
            for artifact_id, key in rows:
                self._artifact_ids[key] = artifact_id
                self._unloaded.add(artifact_id)
        return {k: self._artifact_ids[k] for k in ranking if k in self._artifact_ids}

    def _load_links(self, artifact_ids: Iterable[int], features: list[Any]) -> None:
        # Only artifacts this writer did not annotate itself (resume) need a
        # read of their current values: one query, once.
        wanted = self._unloaded.intersection(artifact_ids)
        if not wanted:
            return
        rows = self._links.filter(
            artifact_id__in=wanted, jsonvalue__feature_id__in=[f.id for f in features]
        ).values_list("artifact_id", "jsonvalue__feature_id", "jsonvalue_id")
        for artifact_id, feature_id, value_id in rows:
            self._link_values[(artifact_id, feature_id)] = value_id
        self._unloaded -= wanted

    def _value_id(self, feature: Any, value: FeatureValue) -> int:
        cache_key = (feature.id, repr(value))
        if cache_key not in self._value_ids:
            record, _ = self._json_value.get_or_create(feature, value)
            self._value_ids[cache_key] = record.id
        return self._value_ids[cache_key]


def _creation_hint(name: str, value: FeatureValue) -> str:
    dtype = "float" if value is None else type(value).__name__
    # lamindb returns an existing feature of the same name unless the type is
    # given; ours live in the lamin_lightning type.
    untyped = ", type=None" if name in DTYPES else ""
    return f"ln.Feature(name={name!r}, dtype={dtype}{untyped}).save()"


def _check_dtype(feature: Any, value: FeatureValue) -> None:
    dtype = getattr(feature, "dtype_as_str", None) or ""
    if value is None or dtype not in ("bool", "int", "float", "num", "str"):
        return
    actual = _PY_DTYPES[type(value)]
    compatible = (
        actual == dtype
        or (dtype in ("float", "num") and actual == "int")
        or (dtype == "num" and actual == "float")
    )
    if not compatible:
        raise LaminLightningError(
            f"Feature {feature.name!r} has dtype {dtype!r} but Checkpoint(features="
            f"...) gives it {value!r} ({actual}). Pass a {dtype} value, or use a "
            "feature of the matching dtype."
        )
