"""Experiment tracking for stage two: ``--report-to tensorboard,mlflow`` (HF Trainer's convention).

Every network of a run's grid is tracked on its own: per optimizer step its training loss and
learning rate (``train/loss``, ``train/learning_rate``), per epoch its mean training loss and
validation metrics (``train/epoch_loss``, ``eval/<metric>``, ``eval/score``), with the run's
(redacted) configuration as hyper-parameters.

- TensorBoard: one subfolder per network under ``<run folder>/tensorboard/``
  (``tensorboard --logdir <run folder>/tensorboard``).
- MLflow: one parent run per run folder, one nested run per network; the tracking URI is
  ``MLFLOW_TRACKING_URI`` when set, else ``file:<run folder>/mlruns``.

The libraries are imported only when a tracker is asked for: a run without tracking imports
neither. A missing one is a ``StageError`` naming the pip extra.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from stages.errors import StageError

EXTRA = "pip install 'lst-pipeline[tracking]'"
EXPERIMENT = "lst-pipeline"


class Tracker(Protocol):
    """What the training loop reports to; ``network`` is a trial's name (``r8-s0-lr0.003``)."""

    def log(self, network: str, values: dict[str, float], step: int) -> None:
        """Scalars of one network at a global step (steps count optimizer steps from 1)."""

    def close(self) -> None:
        """Flush and finish (the run ended, or failed)."""


class NullTracker:
    def log(self, network: str, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, network: str, values: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(network, values, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"task": {"name": "rte"}}`` -> ``{"task.name": "rte"}``; lists as JSON text."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list | tuple | dict):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def wanted(report_to: Iterable[str]) -> list[str]:
    """The trackers asked for, without ``none``, each once, in order."""
    return list(dict.fromkeys(r for r in report_to if r != "none"))


def require(report_to: Iterable[str]) -> None:
    """Fail early, before any work, when a tracker's library is not installed."""
    for name in wanted(report_to):
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import mlflow  # noqa: F401
        except ImportError:
            package = "tensorboard" if name == "tensorboard" else "mlflow-skinny"
            raise StageError(
                f"--report-to {name} needs the {package} package, which is not installed: {EXTRA}"
            ) from None


class TensorBoardTracker:
    """One ``SummaryWriter`` per network, in ``<folder>/<network>``."""

    def __init__(self, folder: Path, networks: list[str], params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writers = {n: SummaryWriter(log_dir=str(folder / n)) for n in networks}
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))
        for w in self.writers.values():
            w.add_text("config", text, 0)

    def log(self, network: str, values: dict[str, float], step: int) -> None:
        w = self.writers[network]
        for k, v in values.items():
            w.add_scalar(k, v, step)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


class MlflowTracker:
    """A parent MLflow run (the run folder) with a nested run per network; metrics are sent in
    batches (per epoch) rather than one request per value."""

    def __init__(
        self, uri: str, run_name: str, networks: list[str], params: dict[str, Any]
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
        self.parent = self.client.create_run(exp_id, tags={MLFLOW_RUN_NAME: run_name}).info.run_id
        self.runs = {
            n: self.client.create_run(
                exp_id, tags={MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: n}
            ).info.run_id
            for n in networks
        }
        items = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]
        for run_id in [self.parent, *self.runs.values()]:
            for lo in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[lo : lo + 100])
        self.pending: dict[str, list[Any]] = {n: [] for n in networks}

    def log(self, network: str, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending[network] += [Metric(k, float(v), now, step) for k, v in values.items()]
        if any(k.startswith("eval/") for k in values) or len(self.pending[network]) >= 900:
            self.flush(network)

    def flush(self, network: str) -> None:
        metrics, self.pending[network] = self.pending[network], []
        for lo in range(0, len(metrics), 900):
            self.client.log_batch(self.runs[network], metrics=metrics[lo : lo + 900])

    def close(self) -> None:
        for n in self.runs:
            self.flush(n)
            self.client.set_terminated(self.runs[n])
        self.client.set_terminated(self.parent)


def mlflow_uri(folder: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a file store in the run folder (MLflow 3 asks for
    ``MLFLOW_ALLOW_FILE_STORE=true`` before it writes one: set unless the user set it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file:{folder.resolve() / 'mlruns'}"


def make_tracker(
    report_to: Iterable[str], folder: Path, networks: list[str], config: dict[str, Any]
) -> Tracker:
    """The trackers ``report_to`` names for a run folder, as one (``NullTracker`` for none)."""
    names = wanted(report_to)
    if not names:
        return NullTracker()
    require(names)
    params = flatten(config)
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(folder / "tensorboard", networks, params))
        else:
            out.append(MlflowTracker(mlflow_uri(folder), folder.name, networks, params))
    return Trackers(out)
