"""A PyTorch Lightning 2.x logger that writes to mboxd.

    from mbox.lightning import MboxLogger
    trainer = Trainer(logger=MboxLogger(name="resnet", namespace="cv", system_metrics_interval_s=10))

The connection: ``client=``, or ``addr=``, ``token=`` and ``tls=`` (as mbox.Client
takes them), or else the default client ($MBOX_ADDR, $MBOX_TOKEN, $MBOX_TLS_CA).

Rank zero logs metrics, hyperparameters and events. Hardware metrics are sampled on
every node: local rank 0 of each node (or every rank, with
``system_metrics_all_ranks=True``) opens the same experiment (creating is idempotent)
and logs ``system/<node>/...`` series (see mbox.system). Importing this module imports
lightning; importing ``mbox`` does not.
"""

import argparse
from typing import Any, Dict, Mapping, Optional

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from ._types import Event, EventSource, MLFramework
from .client import Client, default_client
from .system import SystemMetrics, samples_here


class MboxLogger(Logger):
    def __init__(self, name: str = "lightning", namespace: str = "", owner: str = "",
                 external_id: Optional[str] = None, client: Optional[Client] = None,
                 system_metrics_interval_s: Optional[float] = None, system_metrics_all_ranks: bool = False,
                 addr: Optional[str] = None, token: Optional[str] = None, tls=None):
        super().__init__()
        # Made on first use, on the rank that logs.
        self._connection = None
        if client is None and (addr is not None or token is not None or tls is not None):
            self._connection = dict(addr=addr, token=token, tls=tls)
        self._name = name
        self._namespace = namespace
        self._owner = owner
        self._external_id = external_id
        self._client = client
        self._system_interval = system_metrics_interval_s
        self._system_all_ranks = system_metrics_all_ranks
        self._system = None
        self._system_checked = False
        self._experiment = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._external_id or (self._experiment.id if self._experiment else "")

    def _open_experiment(self):
        if self._client is None and self._connection is not None:
            self._client = Client(self._connection["addr"], token=self._connection["token"],
                                  tls=self._connection["tls"])
        client = self._client or default_client()
        return client.new_experiment(name=self._name, owner=self._owner, namespace=self._namespace,
                                     external_id=self._external_id or "", framework=MLFramework.PYTORCH)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._experiment = self._open_experiment()
            self._start_system_metrics()
        return self._experiment

    def _start_system_metrics(self) -> None:
        """On any rank, once: the node's sampler, where this rank is the one that samples."""
        if not self._system_interval or self._system_checked:
            return
        self._system_checked = True
        if not samples_here(self._system_all_ranks):
            return
        # Rank zero logs into its experiment; other nodes' samplers open the same one.
        experiment = self.experiment if getattr(rank_zero_only, "rank", 0) == 0 else self._open_experiment()
        self._system = SystemMetrics(experiment, self._system_interval, all_ranks=self._system_all_ranks).start()

    # Lightning calls the logging hooks on every rank (each logger keeps to rank zero
    # itself), and log_graph at the start of fit: the first call starts the sampler.

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        self._start_system_metrics()

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._start_system_metrics()
        self._log_metrics(metrics, step)

    @rank_zero_only
    def _log_metrics(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        if epoch is not None:
            metrics["epoch"] = epoch
        self.experiment.log_metrics(metrics, step=step or 0)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._start_system_metrics()
        self._log_hyperparams(params)

    @rank_zero_only
    def _log_hyperparams(self, params: Any) -> None:
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

    def finalize(self, status: str) -> None:
        if self._system is not None:
            self._system.stop()
            self._system.experiment.client.flush()
            self._system = None
        self._finalize(status)

    @rank_zero_only
    def _finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        self._experiment.log_event(Event(name="run_finished", source=EventSource(name="lightning"),
                                         metadata={"status": status}))
        self._experiment.client.flush()
