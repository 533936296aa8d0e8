from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

import lamin_lightning_core as ll


def saved(**overrides: object) -> ll.ArtifactSavedEvent:
    fields: dict[str, object] = {
        "callback_id": "cb",
        "kind": "checkpoint",
        "key": "logs/x/uid/checkpoints/epoch=0.ckpt",
        "local_path": Path("/tmp/epoch=0.ckpt"),
        "storage_uri": "file:///tmp/epoch=0.ckpt",
        "artifact": object(),
        "score": 0.5,
    }
    fields.update(overrides)
    return ll.ArtifactSavedEvent(**fields)  # type: ignore[arg-type]


def test_event_is_frozen() -> None:
    event = saved()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        event.key = "other"  # type: ignore[misc]


def test_json_carries_schema_version_and_never_the_record() -> None:
    event = saved(artifact=object())
    data = json.loads(event.model_dump_json())
    assert data["schema_version"] == ll.SCHEMA_VERSION == 1
    assert data["event_type"] == "artifact_saved"
    assert "artifact" not in data
    assert data["local_path"] == "/tmp/epoch=0.ckpt"
    assert ll.ArtifactSavedEvent.model_validate_json(event.model_dump_json()).key == (
        event.key
    )


def test_nan_score_serialises_as_null() -> None:
    assert json.loads(saved(score=float("nan")).model_dump_json())["score"] is None


@pytest.mark.parametrize(
    "key",
    ["/abs/key", "a/../b", "a//b", "./a", "", "a\\b"],
    ids=["absolute", "climb", "empty-segment", "dot", "empty", "backslash"],
)
def test_unsafe_keys_are_rejected(key: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="key"):
        saved(key=key)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="checkpoint"):
        saved(kind="model")


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="trainer"):
        saved(trainer=object())


def test_json_schema_documents_every_field() -> None:
    schema = ll.ArtifactRemovedEvent.model_json_schema(mode="serialization")
    assert {"kind", "key", "local_path", "storage_uri", "schema_version"} <= set(
        schema["properties"]
    )
    assert "artifact" not in schema["properties"]
