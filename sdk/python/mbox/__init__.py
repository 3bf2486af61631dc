"""mbox: the Python SDK for mboxd.

The calls of ModelBox's "Logging Experiment Metadata" guide work as written::

    import mbox
    from mbox import MLFramework, Event, EventSource

    experiment = mbox.new_experiment(name="yolo-v4", owner="foo@bar.com", namespace="cv",
                                     external_id="ext1", framework=MLFramework.PYTORCH)
    experiment.update_metadata(key="hyperparams", value={"fc_layers": 3, "lr": 0.0002})
    experiment.log_metrics(metrics={"loss": 2.4, "accu": 97.6}, step=10, wallclock=12345)
    experiment.log_event(Event(name="checkpoint_started", source=EventSource(name="trainer"),
                               wallclock_time=12000, metadata={"chk_size": 2345}))

``log_metrics`` and ``log_event`` never wait for the network: points go into a bounded
buffer and a background thread sends them to mboxd in columnar batches. ``flush()``
waits until everything logged so far is acknowledged; ``close()`` and an atexit hook
flush too. Every batch carries a client batch id, kept on its retries, so a retry
after a lost response is not stored twice. Importing mbox imports neither torch nor
lightning; it works with protobuf 4.21 to 7.x and grpcio 1.56 onwards.

Where mboxd asks for a token and TLS: ``mbox.Client(addr, token=..., tls="ca.crt")``,
or MBOX_TOKEN and MBOX_TLS_CA in the environment (the default client reads them).

Reading: ``experiment.metrics(keys, start_step, end_step, max_points)``,
``experiment.metadata()``, ``experiment.events()``, and run search with
``mbox.search(namespace, filter=..., order_by=[...])`` / ``mbox.search_df(...)``.
"""

import os as _os

# gRPC supports fork() (a DataLoader worker, say) only with its fork support on, and
# only if that is set before grpc is first imported. Respect an explicit setting.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "true")
_os.environ.setdefault("GRPC_POLL_STRATEGY", "poll")

from ._types import Event, EventSource, MetricSeries, MetricSummary, MLFramework, UpdateMetadataResult
from .client import TLS, Client, DeliveryError, default_client
from .experiment import Experiment

__all__ = [
    "Client",
    "DeliveryError",
    "Event",
    "EventSource",
    "Experiment",
    "MLFramework",
    "MetricSeries",
    "MetricSummary",
    "TLS",
    "UpdateMetadataResult",
    "close",
    "default_client",
    "experiment",
    "experiments",
    "flush",
    "new_experiment",
    "search",
    "search_df",
]


def new_experiment(name, owner="", namespace="", external_id="", framework=MLFramework.UNKNOWN, task="", metadata=None):
    """Creates (or finds: the call is idempotent) an experiment on the default client."""
    return default_client().new_experiment(
        name=name, owner=owner, namespace=namespace, external_id=external_id,
        framework=framework, task=task, metadata=metadata,
    )


def experiments(namespace=""):
    """Experiments of a namespace, on the default client."""
    return default_client().experiments(namespace)


def experiment(id):
    """The experiment with this id, on the default client."""
    return default_client().experiment(id)


def search(namespace="", filter="", order_by=None, limit=None, page_size=None):
    """Experiments matching a filter, with metadata and metric summaries, on the
    default client: an iterator that fetches pages lazily (see Client.search)."""
    return default_client().search(namespace, filter=filter, order_by=order_by, limit=limit, page_size=page_size)


def search_df(namespace="", filter="", order_by=None, limit=None, page_size=None):
    """search(...) as a pandas DataFrame (needs pandas)."""
    return default_client().search_df(namespace, filter=filter, order_by=order_by, limit=limit, page_size=page_size)


def flush(timeout=None):
    """Waits until everything logged so far on the default client is acknowledged."""
    default_client().flush(timeout)


def close(timeout=None):
    """Flushes and closes the default client."""
    default_client().close(timeout)
