from __future__ import annotations

import pytest

import lamin_lightning_core as ll
from lamin_lightning_core import hookspecs


def test_lazy_names_resolve_and_unknown_names_fail() -> None:
    from lightning.pytorch.cli import SaveConfigCallback

    assert issubclass(ll.SaveConfigCallback, SaveConfigCallback)
    assert ll.ArtifactSavedEvent.model_fields["key"].is_required()
    assert set(ll.__all__) <= set(dir(ll))
    assert "annotations" not in dir(ll)  # the __future__ import is not ours
    with pytest.raises(AttributeError, match="has no attribute 'Chekpoint'"):
        ll.Chekpoint  # noqa: B018


def _isort_style(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_complete() -> None:
    public = {name for name in vars(ll) if not name.startswith("_")}
    public |= set(ll._LAZY)
    modules = {name for name in public if type(getattr(ll, name)).__name__ == "module"}
    assert ll.__all__ == sorted(ll.__all__, key=_isort_style)
    assert set(ll.__all__) == public - modules - {"annotations"}


def test_every_hook_is_prefixed_and_documented() -> None:
    hooks = [name for name in vars(hookspecs) if name.startswith("lamin_lightning_")]
    assert len(hooks) >= 7
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__
        assert doc and len(doc.strip()) > 40, name
