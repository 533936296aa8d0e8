"""The main job: LightningCLI training whose checkpoints land in LaminDB.

    python examples/digits/train.py fit --config examples/digits/config.yaml

With no LaminDB instance configured, a local one is created under
``.lamin-lightning/`` in the project folder (the embedded default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lamin_lightning_adapters.lamindb import ensure_local_instance

PROJECT = Path(__file__).resolve().parents[2]
DEMO_DIR = PROJECT / ".lamin-lightning"
ensure_local_instance(DEMO_DIR, name="lamin-lightning-demo")

import lamindb as ln  # noqa: E402  (after the instance is chosen)
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from rich.console import Console  # noqa: E402

import lamin_lightning_core as ll  # noqa: E402
from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from model import DigitsClassifier, DigitsDataModule  # noqa: E402


def report(checkpoint: ll.Checkpoint) -> None:
    """Print what was persisted: keys, URIs, the best checkpoint, lineage."""
    console = Console(width=120)
    run = ln.context.run
    best = checkpoint.last_event("checkpoint")
    best_key = checkpoint.key_for("checkpoint", checkpoint.best_model_path)
    console.rule(f"Persisted by run {run.uid} under {checkpoint.base_prefix}/")
    inputs = list(run.input_artifacts.all())
    outputs = list(ln.Artifact.filter(run=run).order_by("created_at"))
    hparams = checkpoint.last_hparams_artifact
    for role, artifacts in (("input", inputs), ("output", outputs)):
        for artifact in artifacts:
            mark = "  <- best" if artifact.key == best_key else ""
            console.print(f"[bold]{role:6}[/] {artifact.key}{mark}")
            console.print(f"       {artifact.path}", soft_wrap=True)
    if hparams is not None:
        console.print(f"[bold]hparams[/] {hparams.key} (neither input nor output)")
        console.print(f"       {hparams.path}", soft_wrap=True)
    console.print(
        f"best checkpoint: {best_key} "
        f"(val_loss={float(checkpoint.best_model_score):.4f})"
    )
    config = checkpoint.last_config_artifact
    console.print(f"config artifact: {config.key if config else None}")
    console.print(f"run inputs: {len(inputs)}, run outputs: {len(outputs)}")
    for link in checkpoint.backend_runs:
        where = link.url or "offline"
        console.print(f"mirrored in {link.system}: run {link.run_id} ({where})")
    if best is not None:
        console.print(f"last event: {best.model_dump_json()}", soft_wrap=True)


def keep_mlflow_artifacts_in_demo_folder() -> None:
    # MLflow stores run files in ./mlruns unless the experiment names a place;
    # with the demo's own tracking database, keep them beside it.
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(f"sqlite:///{DEMO_DIR}"):
        return
    import mlflow

    name = "lamin-lightning-demo"
    if mlflow.get_experiment_by_name(name) is None:
        location = (DEMO_DIR / "mlflow-artifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def main() -> None:
    mark_local_instance_offline_safe()
    keep_mlflow_artifacts_in_demo_folder()
    ll.save_lightning_features()  # score, rank, best/last on each checkpoint
    ln.track()
    cli = LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        save_config_callback=ll.SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ll.Checkpoint)]
    report(callbacks[0])
    ln.finish()


if __name__ == "__main__":
    main()
