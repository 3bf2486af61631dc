"""Hardware metrics sampled in a background thread, once per node: CPU, memory, disk
and network I/O (psutil) and, when NVML is available, per-GPU utilisation, memory,
power, temperature and SM clock.

Series are named by node, so every node of a distributed job is told apart::

    system/<node>/cpu_percent
    system/<node>/memory_used_bytes
    system/<node>/gpu<i>/utilization_percent        (i: the GPU's NVML index on the node)

Only local rank 0 of each node samples (``LOCAL_RANK``, as torchrun and Lightning
set it; unset means 0), so a node's figures are logged once however many ranks it
runs. With ``all_ranks=True`` every rank samples, under
``system/<node>/rank<local rank>/...``. The node is ``$MBOX_NODE`` if set, else
``node<NODE_RANK>`` (Lightning) or ``node<GROUP_RANK>`` (torchrun), else the host name.
"""

import logging
import os
import re
import socket
import threading
from typing import Optional

log = logging.getLogger("mbox")

_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_NODE_RANK_VARS = ("NODE_RANK", "GROUP_RANK")


def _int_env(names) -> Optional[int]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def local_rank() -> int:
    """This process's rank on its node (0 when no launcher says otherwise)."""
    rank = _int_env(_LOCAL_RANK_VARS)
    return 0 if rank is None else rank


def node_name() -> str:
    """The name of this node in series names: $MBOX_NODE, node<NODE_RANK>,
    node<GROUP_RANK>, else the short host name."""
    explicit = os.environ.get("MBOX_NODE", "").strip()
    if explicit:
        return _path_safe(explicit)
    rank = _int_env(_NODE_RANK_VARS)
    if rank is not None:
        return f"node{rank}"
    return _path_safe(socket.gethostname().split(".")[0]) or "node"


def _path_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def samples_here(all_ranks: bool = False) -> bool:
    """Whether this process samples: local rank 0 does, others only with all_ranks."""
    return all_ranks or local_rank() == 0


class SystemMetrics:
    """Samples every `interval_s` into `experiment`. On a rank that does not sample
    (see the module doc) it is inactive: ``active`` is False and start() / stop() do
    nothing. `nvml` replaces the pynvml module (for tests or another binding)."""

    def __init__(self, experiment, interval_s: float = 10.0, *, all_ranks: bool = False, node: Optional[str] = None,
                 nvml=None):
        self.experiment = experiment
        self.interval_s = interval_s
        self.node = _path_safe(node) if node else node_name()
        self.local_rank = local_rank()
        self.active = samples_here(all_ranks)
        self.prefix = f"system/{self.node}/" + (f"rank{self.local_rank}/" if all_ranks else "")
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        self._gpus = []
        if not self.active:
            return
        import psutil  # the "system" extra

        self._psutil = psutil
        self._process = psutil.Process()
        try:
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py

            nvml.nvmlInit()
            self._nvml = nvml
            self._gpus = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - no NVML, no driver, or no GPU
            log.debug("mbox: no GPU metrics: %s", e)
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def start(self) -> "SystemMetrics":
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mbox-system-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> dict:
        ps = self._psutil
        p = self.prefix
        vm = ps.virtual_memory()
        m = {
            p + "cpu_percent": ps.cpu_percent(None),
            p + "process_cpu_percent": self._process.cpu_percent(None),
            p + "process_rss_bytes": self._process.memory_info().rss,
            p + "memory_used_bytes": vm.used,
            p + "memory_percent": vm.percent,
        }
        disk = ps.disk_io_counters()
        if disk is not None:
            m[p + "disk_read_bytes"] = disk.read_bytes
            m[p + "disk_write_bytes"] = disk.write_bytes
        net = ps.net_io_counters()
        if net is not None:
            m[p + "net_sent_bytes"] = net.bytes_sent
            m[p + "net_recv_bytes"] = net.bytes_recv
        for i, h in enumerate(self._gpus):
            m.update(self._gpu_sample(f"{p}gpu{i}/", h))
        return m

    def _gpu_sample(self, prefix: str, h) -> dict:
        nv = self._nvml
        m = {}
        # Each figure on its own: a GPU may not support one (power, say).
        for name, read in (
            ("utilization_percent", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            ("memory_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
            ("memory_total_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h).total),
            ("power_watts", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        ):
            try:
                m[prefix + name] = read()
            except Exception as e:  # noqa: BLE001 - one figure's failure must not stop the rest
                log.debug("mbox: %s%s: %s", prefix, name, e)
        return m

    def _run(self):
        step = 0
        while not self._stop.wait(self.interval_s):
            try:
                self.experiment.log_metrics(self.sample(), step=step)
            except Exception as e:  # noqa: BLE001 - keep sampling
                log.warning("mbox: system metrics sample failed: %s", e)
            step += 1
