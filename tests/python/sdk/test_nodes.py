"""Hardware metrics from every node of a distributed job: processes started with the
variables torchrun and Lightning set for two nodes of two ranks each (NODE_RANK,
GROUP_RANK, LOCAL_RANK, RANK, WORLD_SIZE...) log each node's series once, from one
sampler per node; GPU series are named per node and GPU (a fake NVML stands in for
the driver), and the tutorial's DuckDB query averages them over the job."""

import json
import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import duckdb
import pytest

import mbox
from mbox.system import SystemMetrics, local_rank, node_name

ROOT = pathlib.Path(__file__).resolve().parents[3]


def launcher_env(node_rank, local_rank, nodes=2, per_node=2):
    """The variables torchrun sets (Lightning sets the same, NODE_RANK included)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MBOX_NODE", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "SLURM_LOCALID")}
    env.update(NODE_RANK=str(node_rank), GROUP_RANK=str(node_rank), LOCAL_RANK=str(local_rank),
               RANK=str(node_rank * per_node + local_rank), WORLD_SIZE=str(nodes * per_node),
               LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    return env


def run_job(script, addr, *args):
    """Two nodes x two local ranks, all at once; each prints one JSON line."""
    procs = [subprocess.Popen([sys.executable, "-c", script, addr, *args], env=launcher_env(n, r),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2) for r in range(2)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


SAMPLER_SCRIPT = """
import json, os, sys, time, mbox
client = mbox.Client(sys.argv[1])
exp = client.new_experiment(name=sys.argv[2], namespace="nodes")  # every rank: idempotent
sampler = exp.start_system_metrics(interval_s=0.2, all_ranks=sys.argv[3] == "all")
exp.log_metrics({"rank_" + os.environ["RANK"]: 1.0}, step=0)
time.sleep(1.3)
sampler.stop()
client.close(timeout=30)
print(json.dumps({"rank": int(os.environ["RANK"]), "active": sampler.active, "prefix": sampler.prefix,
                  "experiment": exp.id}))
"""


def parquet_counts(data_dir, experiment_id):
    """(key, step) -> rows in the published Parquet files."""
    rows = duckdb.connect().execute(
        f"SELECT key, step, count(*) FROM read_parquet('{data_dir}/metrics/**/*.parquet', hive_partitioning = true)"
        f" WHERE experiment_id = ? GROUP BY ALL", [experiment_id]).fetchall()
    return {(k, s): n for k, s, n in rows}


def system_series(counts):
    keys = {}
    for (key, step), n in counts.items():
        if key.startswith("system/"):
            keys.setdefault(key, []).append((step, n))
    return keys


def test_one_sampler_per_node_names_each_nodes_series(mboxd):
    reports = run_job(SAMPLER_SCRIPT, mboxd.addr, "ddp", "node")
    assert [(r["rank"], r["active"]) for r in sorted(reports, key=lambda r: r["rank"])] == [
        (0, True), (1, False), (2, True), (3, False)]
    assert sorted(r["prefix"] for r in reports if r["active"]) == ["system/node0/", "system/node1/"]
    exp = reports[0]["experiment"]
    assert all(r["experiment"] == exp for r in reports)

    assert mboxd.stop() == 0
    counts = parquet_counts(mboxd.data_dir, exp)
    assert {k for k, _ in counts if not k.startswith("system/")} == {"rank_0", "rank_1", "rank_2", "rank_3"}
    keys = system_series(counts)
    nodes = {k.split("/")[1] for k in keys}
    assert nodes == {"node0", "node1"}, sorted(keys)
    for node in nodes:
        for name in ("cpu_percent", "memory_used_bytes", "memory_percent", "process_rss_bytes"):
            assert f"system/{node}/{name}" in keys, (node, name)
    for key, points in keys.items():
        # One sampler per node: each step once, 0, 1, 2, ... with no gap.
        steps = sorted(s for s, _ in points)
        assert steps == list(range(len(steps))) and len(steps) >= 3, (key, steps)
        assert all(n == 1 for _, n in points), (key, points)


def test_all_ranks_samples_every_rank_under_its_own_name(mboxd):
    reports = run_job(SAMPLER_SCRIPT, mboxd.addr, "ddp-all", "all")
    assert all(r["active"] for r in reports)
    assert sorted(r["prefix"] for r in reports) == [
        "system/node0/rank0/", "system/node0/rank1/", "system/node1/rank0/", "system/node1/rank1/"]
    exp = reports[0]["experiment"]
    assert mboxd.stop() == 0
    keys = system_series(parquet_counts(mboxd.data_dir, exp))
    assert {"/".join(k.split("/")[1:3]) for k in keys} == {"node0/rank0", "node0/rank1", "node1/rank0",
                                                            "node1/rank1"}
    assert all(n == 1 for points in keys.values() for _, n in points)


# The two rank utilities of Lightning that MboxLogger relies on, as Lightning defines
# them (rank from the launcher's RANK), for a stand-in `lightning` package: the
# default test environment does not install Lightning (test_lightning.py runs the
# real one where it is).
LIGHTNING_STANDIN = {
    "lightning/__init__.py": "",
    "lightning/pytorch/__init__.py": "",
    "lightning/pytorch/loggers/__init__.py": "",
    "lightning/pytorch/loggers/logger.py": '''
import functools
from lightning.pytorch.utilities import rank_zero_only

class Logger:
    def __init__(self):
        pass

def rank_zero_experiment(fn):
    @functools.wraps(fn)
    def experiment(self):
        return fn(self) if rank_zero_only.rank == 0 else None  # Lightning: a DummyExperiment
    return experiment
''',
    "lightning/pytorch/utilities/__init__.py": '''
import functools, os

def rank_zero_only(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if rank_zero_only.rank == 0:
            return fn(*args, **kwargs)
    return wrapped

rank_zero_only.rank = int(os.environ.get("RANK", 0))
''',
}

LOGGER_SCRIPT = """
import json, os, sys, time, mbox
from mbox.lightning import MboxLogger
client = mbox.Client(sys.argv[1])
logger = MboxLogger(name="ddp-logger", namespace="nodes", client=client, system_metrics_interval_s=0.2)
# What Lightning calls on every rank: log_graph at the start of fit, then the logging
# hooks (which keep to rank zero themselves), finalize at the end.
logger.log_graph(None)
logger.log_hyperparams({"lr": 0.1})
logger.log_metrics({"loss": 0.5}, step=int(os.environ["RANK"]))
time.sleep(1.3)
sampling = logger._system is not None
prefix = logger._system.prefix if sampling else None
logger.finalize("success")
print(json.dumps({"rank": int(os.environ["RANK"]), "active": sampling, "prefix": prefix}))
"""


def test_mbox_logger_samples_once_per_node(mboxd, tmp_path, monkeypatch):
    for path, text in LIGHTNING_STANDIN.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    reports = run_job(LOGGER_SCRIPT, mboxd.addr)
    assert sorted((r["rank"], r["active"], r["prefix"]) for r in reports) == [
        (0, True, "system/node0/"), (1, False, None), (2, True, "system/node1/"), (3, False, None)]
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="ddp-logger", namespace="nodes", framework=mbox.MLFramework.PYTORCH)
    m = exp.metrics()
    assert m["loss"].steps == [0]  # rank zero only
    assert exp.metadata() == {"lr": 0.1}
    assert [e.name for e in exp.events()] == ["run_finished"]
    client.close(timeout=5)
    assert mboxd.stop() == 0
    keys = system_series(parquet_counts(mboxd.data_dir, exp.id))
    assert {k.split("/")[1] for k in keys} == {"node0", "node1"}
    assert all(n == 1 for points in keys.values() for _, n in points)


def test_node_and_rank_come_from_the_launchers_variables(monkeypatch):
    for var in ("MBOX_NODE", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-host-7.cluster.example")
    assert (node_name(), local_rank()) == ("gpu-host-7", 0)
    monkeypatch.setenv("GROUP_RANK", "3")  # torchrun
    assert node_name() == "node3"
    monkeypatch.setenv("NODE_RANK", "5")  # Lightning
    assert node_name() == "node5"
    monkeypatch.setenv("MBOX_NODE", "rack2/a")
    assert node_name() == "rack2_a"
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_rank() == 1
    assert not SystemMetrics(None, all_ranks=False).active


class FakeNvml:
    """The pynvml calls SystemMetrics makes, for GPUs whose utilisation is given."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, utilization):
        self.utilization = utilization  # per GPU: a list of values, one per sample

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.utilization)

    def nvmlDeviceGetHandleByIndex(self, i):
        return SimpleNamespace(index=i, samples=iter(self.utilization[i]))

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=next(h.samples), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h.index + 1) << 30, total=80 << 30, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if h.index == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # one figure missing must not hide the rest
        return 350_000

    def nvmlDeviceGetTemperature(self, h, kind):
        return 60

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980


def tutorial_sql(marker):
    """The ```sql block of docs/tutorial.md that contains `marker`."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_gpu_series_per_node_and_the_tutorials_job_average(mboxd):
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="gpus", namespace="nodes")
    samplers = {
        "node0": SystemMetrics(exp, node="node0", nvml=FakeNvml([[50, 70, 90], [10, 30, 50]])),
        "node1": SystemMetrics(exp, node="node1", nvml=FakeNvml([[100, 100, 100], [0, 0, 0]])),
    }
    for step in range(3):
        for sampler in samplers.values():
            exp.log_metrics(sampler.sample(), step=step)
    keys = set(exp.metrics())
    for node in samplers:
        for gpu in (0, 1):
            for name in ("utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c",
                         "sm_clock_mhz"):
                assert f"system/{node}/gpu{gpu}/{name}" in keys
        assert f"system/{node}/gpu0/power_watts" in keys and f"system/{node}/gpu1/power_watts" not in keys
        assert f"system/{node}/cpu_percent" in keys
    client.close(timeout=10)
    assert mboxd.stop() == 0

    sql = tutorial_sql("ROLLUP").replace("mbox-data", str(mboxd.data_dir))
    sql = sql.replace("2b2a19e145c92827d50144d50ee13c68", exp.id)
    rows = duckdb.connect().execute(sql).fetchall()
    # node0: GPU 0 averages 70, GPU 1 30 -> 50; node1: 100 and 0 -> 50; the job: 50.
    assert rows == [("node0", 50.0), ("node1", 50.0), (None, 50.0)]
    per_gpu = duckdb.connect().execute(tutorial_sql("gpu_index").replace("mbox-data", str(mboxd.data_dir))
                                       .replace("2b2a19e145c92827d50144d50ee13c68", exp.id)).fetchall()
    assert per_gpu == [("node0", 0, 70.0), ("node0", 1, 30.0), ("node1", 0, 100.0), ("node1", 1, 0.0)]
