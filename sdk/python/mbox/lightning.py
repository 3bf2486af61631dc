"""A PyTorch Lightning 2.x logger that writes to mboxd.

    from mbox.lightning import MboxLogger
    trainer = Trainer(logger=MboxLogger(name="resnet", namespace="cv"))

Only rank zero talks to mboxd. Importing this module imports lightning; importing
``mbox`` does not.
"""

import argparse
from typing import Any, Dict, Mapping, Optional

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from ._types import Event, EventSource, MLFramework
from .client import Client, default_client


class MboxLogger(Logger):
    def __init__(self, name: str = "lightning", namespace: str = "", owner: str = "",
                 external_id: Optional[str] = None, client: Optional[Client] = None,
                 system_metrics_interval_s: Optional[float] = None):
        super().__init__()
        self._name = name
        self._namespace = namespace
        self._owner = owner
        self._external_id = external_id
        self._client = client
        self._system_interval = system_metrics_interval_s
        self._system = None
        self._experiment = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._external_id or (self._experiment.id if self._experiment else "")

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            client = self._client or default_client()
            self._experiment = client.new_experiment(name=self._name, owner=self._owner, namespace=self._namespace,
                                                     external_id=self._external_id or "",
                                                     framework=MLFramework.PYTORCH)
            if self._system_interval:
                self._system = self._experiment.start_system_metrics(self._system_interval)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        if epoch is not None:
            metrics["epoch"] = epoch
        self.experiment.log_metrics(metrics, step=step or 0)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, argparse.Namespace):
            params = vars(params)
        params: Dict[str, Any] = dict(params or {})
        for key, value in params.items():
            # Nested values are kept as JSON structure, not flattened.
            self.experiment.update_metadata(key=str(key), value=value)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        score = getattr(checkpoint_callback, "best_model_score", None)
        self.experiment.log_event(Event(
            name="checkpoint", source=EventSource(name="lightning"),
            metadata={
                "path": getattr(checkpoint_callback, "last_model_path", "") or
                getattr(checkpoint_callback, "best_model_path", ""),
                "best_model_path": getattr(checkpoint_callback, "best_model_path", ""),
                "score": None if score is None else float(score),
                "step": int(getattr(checkpoint_callback, "_last_global_step_saved", -1)),
            }))

    @rank_zero_only
    def save(self) -> None:
        if self._experiment is not None:
            self._experiment.client.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        if self._system is not None:
            self._system.stop()
        self._experiment.log_event(Event(name="run_finished", source=EventSource(name="lightning"),
                                         metadata={"status": status}))
        self._experiment.client.flush()
