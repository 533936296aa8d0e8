"""The core imports and works with no backend library importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import importlib.abc, importlib.util, json, sys

BACKENDS = ("lamindb", "lamindb_setup", "wandb", "mlflow", "clearml")

class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BACKENDS:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Uninstalled())
# find_spec of an uninstalled top-level package answers None, not an error.
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in BACKENDS else real_find_spec(name, package)
)

import lamin_lightning_core as ll
ll.Checkpoint
deferred = sorted({"pydantic", "pluggy"} - set(sys.modules))
from tests.helpers import fit

imported = sorted(m for m in sys.modules if m.split(".")[0] in BACKENDS)
saved = []
class Observer:
    def on_artifact_saved(self, event):
        saved.append(json.loads(event.model_dump_json()))

checkpoint = ll.Checkpoint(artifact_observers=[Observer()])
fit([checkpoint], sys.argv[1], steps=2)
inactive = dict(checkpoint._bus.inactive)
print(json.dumps({
    "imported": imported, "saved": saved, "inactive": inactive, "deferred": deferred
}))
"""


@pytest.mark.slow
def test_core_works_without_any_backend(tmp_path: Path) -> None:
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert result["deferred"] == ["pydantic"]  # loads with the first Checkpoint()
    [event] = result["saved"]
    assert event["storage_uri"].startswith("file:///")
    assert event["key"] == "checkpoints/epoch=0-step=2.ckpt"
    for plugin, extra in [("lamindb", "lamindb"), ("wandb", "wandb")]:
        assert f"lamin-lightning[{extra}]" in result["inactive"][plugin]
