"""Trackers: the metrics of `metrics.jsonl` also sent to TensorBoard and MLflow.

`kd.fit(..., loggers=["tensorboard", "mlflow"])` (or tracker objects) and ``train.log:
[tensorboard, mlflow]`` in a recipe. Every record the loop writes to `metrics.jsonl` (one per
epoch per model: ``lr``, ``train_loss``, ``train_parts`` (one scalar per term), ``val_*``,
``seconds``, …) goes to each tracker as scalars at step = epoch; a recipe run also sends its
settings (the recipe, flattened), its results table (each model's test metrics, parameters and
costs) and its report files.

- `TensorBoardTracker(folder)`: event files, one sub-folder per model (``teacher``,
  ``student/kd/seed0``) so that TensorBoard overlays the models' curves tag by tag; nested
  dicts become ``train_parts/kd``. The results table is the run ``results``.
- `MLflowTracker(folder | tracking_uri, experiment)`: a local store (``sqlite:///<folder>/
  mlflow.db``, artifacts in ``<folder>/mlartifacts``; MLflow 3 refuses new plain-file stores);
  one parent MLflow run per `kdistill run` (or per `kd.fit` call) in the experiment, holding the
  recipe as parameters, the results as metrics and the report as artifacts, and one nested run
  per trained model holding its epochs.

Both libraries are optional extras: a missing one is an ImportError naming
``pip install 'kdistill[tensorboard]'`` / ``'kdistill[mlflow]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")
_SKIP = ("model", "epoch")


def flat_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of `record` (nested dicts as ``outer/inner``), without the record's
    ``model`` and ``epoch`` keys; booleans and strings are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in _SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def flat_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`settings` (a recipe dump) as ``a.b.c → str(value)``; lists kept whole."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def _missing(extra: str, module: str, error: ImportError) -> ImportError:
    return ImportError(
        f"the {extra} tracker needs the {module!r} package, which is not installed: "
        f"pip install 'kdistill[{extra}]'"
    ).with_traceback(error.__traceback__)


class Tracker:
    """What the loop and the recipe runner call; every method may be a no-op."""

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One `metrics.jsonl` record (``model`` and ``epoch`` keys, numbers, nested dicts)."""

    def log_params(self, settings: Mapping[str, Any]) -> None:
        """The run's settings (a recipe), flattened to ``a.b.c``."""

    def log_results(self, label: str, metrics: Mapping[str, Any]) -> None:
        """One row of the results table: a trained model's test metrics, size and costs."""

    def log_artifact(self, path: Path) -> None:
        """A file of the run (the report)."""

    def close(self) -> None:
        """Flush and release; the tracker takes nothing more."""


class TensorBoardTracker(Tracker):
    """Event files under `folder`, one sub-folder (TensorBoard "run") per model label."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer imports the tensorboard package
            raise _missing("tensorboard", "tensorboard", error) from error
        self.folder = Path(folder)
        self._writer_class = SummaryWriter
        self._writers: dict[str, Any] = {}

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = self._writer_class(log_dir=str(self.folder / run))
        return self._writers[run]

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        writer = self._writer(str(record.get("model", "model")))
        step = int(record.get("epoch", 0))
        for tag, value in flat_scalars(record).items():
            writer.add_scalar(tag, value, step)
        writer.flush()

    def log_params(self, settings: Mapping[str, Any]) -> None:
        lines = [f"| {k} | {v} |" for k, v in flat_params(settings).items()]
        text = "| setting | value |\n|---|---|\n" + "\n".join(lines)
        self._writer("results").add_text("settings", text, 0)

    def log_results(self, label: str, metrics: Mapping[str, Any]) -> None:
        writer = self._writer("results")
        for tag, value in flat_scalars(metrics).items():
            writer.add_scalar(f"{label}/{tag}", value, 0)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class MLflowTracker(Tracker):
    """A parent MLflow run in `experiment`, one nested run per model label."""

    def __init__(
        self,
        folder: str | Path | None = None,
        experiment: str = "kdistill",
        run_name: str | None = None,
        tracking_uri: str | None = None,
    ):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise _missing("mlflow", "mlflow", error) from error
        if (folder is None) == (tracking_uri is None):
            raise ConfigError(
                "MLflowTracker needs exactly one of folder (a local store is made there) and "
                "tracking_uri (an MLflow server or database), got "
                f"folder={folder!r}, tracking_uri={tracking_uri!r}"
            )
        artifacts = None
        if folder is not None:
            root = Path(folder).resolve()
            root.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
            artifacts = (root / "mlartifacts").as_uri()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifacts
            )
        else:
            self.experiment_id = found.experiment_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        self._children: dict[str, str] = {}

    def child_run(self, label: str) -> str:
        """The nested run of model `label` (made on its first record)."""
        if label not in self._children:
            run = self.client.create_run(
                self.experiment_id,
                run_name=label,
                tags={"mlflow.parentRunId": self.run_id, "kdistill.model": label},
            )
            self._children[label] = run.info.run_id
        return self._children[label]

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        run = self.child_run(str(record.get("model", "model")))
        step = int(record.get("epoch", 0))
        metrics = [
            Metric(_mlflow_key(key), value, 0, step) for key, value in flat_scalars(record).items()
        ]
        if metrics:
            self.client.log_batch(run, metrics=metrics)

    def log_params(self, settings: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(_mlflow_key(k), v[:6000]) for k, v in flat_params(settings).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_results(self, label: str, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        batch = [
            Metric(_mlflow_key(f"{label}/{key}"), value, 0, 0)
            for key, value in flat_scalars(metrics).items()
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        for run in self._children.values():
            self.client.set_terminated(run)
        self._children.clear()
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits and ``_-./ :``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ :" else "_" for c in key)


def open_trackers(
    loggers: Sequence[str | Tracker] | None,
    folder: Path | None,
    experiment: str = "kdistill",
    run_name: str | None = None,
) -> tuple[list[Tracker], list[Tracker]]:
    """(all trackers, the ones made here, which the caller closes). A name is made under
    `folder`: ``tensorboard`` → ``<folder>/tensorboard``, ``mlflow`` → ``<folder>/mlflow``."""
    trackers: list[Tracker] = []
    made: list[Tracker] = []
    for item in loggers or ():
        if isinstance(item, Tracker):
            trackers.append(item)
            continue
        if item not in TRACKERS:
            raise ConfigError(
                f"loggers: unknown tracker {item!r}; use one of {list(TRACKERS)} or a "
                "kdistill.engine.trackers.Tracker object"
            )
        if folder is None:
            raise ConfigError(
                f"loggers: {item!r} needs a folder to write to: pass metrics_log= (its folder "
                "is used) or a tracker object, e.g. TensorBoardTracker('runs/x')"
            )
        tracker: Tracker
        if item == "tensorboard":
            tracker = TensorBoardTracker(Path(folder) / "tensorboard")
        else:
            tracker = MLflowTracker(Path(folder) / "mlflow", experiment, run_name)
        trackers.append(tracker)
        made.append(tracker)
    return trackers, made
