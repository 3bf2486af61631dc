"""Non-blocking logging: mboxd down, buffer policies, flush, fork safety, values."""

import subprocess
import sys
import time

import numpy as np
import pytest

import mbox
import mbox.system
from harness import Mboxd, free_port


def test_logging_while_mboxd_is_down_delivers_everything_exactly_once_later(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    server = Mboxd(data, listen=f"127.0.0.1:{port}")
    client = mbox.Client(f"127.0.0.1:{port}")
    exp = client.new_experiment(name="offline", namespace="t")
    assert server.stop() == 0

    started = time.monotonic()
    for step in range(10_000):
        exp.log_metrics({"loss": 1.0 / (step + 1), "acc": step * 0.001, "lr": 0.1}, step=step)
    elapsed = time.monotonic() - started
    # 30,000 points fit the default 1,000,000-point buffer: no call waited on mboxd.
    assert elapsed < 5, f"log_metrics blocked while mboxd was down ({elapsed:.1f}s)"

    server = Mboxd(data, listen=f"127.0.0.1:{port}")
    try:
        client.flush(timeout=60)
        metrics = exp.metrics()
        for key in ("loss", "acc", "lr"):
            assert metrics[key].steps == list(range(10_000)), key
        assert metrics["loss"].values[9] == pytest.approx(0.1)
    finally:
        client.close(timeout=10)
        assert server.stop() == 0


def test_mboxd_stops_promptly_while_an_idle_client_is_connected(tmp_path):
    # mboxd's graceful stop sends GOAWAY and a PING on each connection and waits for
    # them to close; a client whose idle connection nobody reads (grpcio 1.70 without
    # the SDK's connectivity watch) held it open for good.
    server = Mboxd(tmp_path / "data")
    client = mbox.Client(server.addr)
    client.new_experiment(name="idle", namespace="t")
    time.sleep(0.5)  # idle: no call in flight
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 15
    client.close(timeout=5)


def test_drop_policy_counts_what_it_drops():
    client = mbox.Client(f"127.0.0.1:{free_port()}", buffer_points=100, on_full="drop")
    for step in range(50):
        client.log_metrics("no-such-experiment", {f"k{i}": 1.0 for i in range(10)}, step=step)
    # Ten calls fill the buffer; the other forty are dropped whole.
    assert client.dropped == 400
    with pytest.raises(TimeoutError):
        client.close(timeout=0.3)
    assert not client._thread.is_alive(), "close() stops the sender even when it cannot deliver"


def test_rejected_data_makes_flush_raise(mboxd):
    client = mbox.Client(mboxd.addr)
    client.log_metrics("no-such-experiment", {"loss": 1.0}, step=1)
    with pytest.raises(mbox.DeliveryError) as err:
        client.flush(timeout=10)
    assert "NOT_FOUND" in str(err.value)
    client.close(timeout=5)


def test_value_kinds_and_numpy_scalars(mboxd):
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="kinds", namespace="t")
    exp.log_metrics({"f": np.float32(0.5), "i": np.int64(7), "b": True, "s": "text", "raw": b"\x00\xff",
                     "zero_d": np.array(3.25)}, step=1)
    with pytest.raises(TypeError):
        exp.log_metrics({"bad": [1, 2]}, step=2)
    m = exp.metrics()
    assert {k: v.values for k, v in m.items()} == {
        "b": [1.0], "f": [0.5], "i": [7.0], "raw": [b"\x00\xff"], "s": ["text"], "zero_d": [3.25]}
    client.close(timeout=5)


FORK_SCRIPT = """
import os, sys, mbox
client = mbox.Client(sys.argv[1])
exp = client.new_experiment(name="fork", namespace="t")
exp.log_metrics({"parent": 1.0}, step=0)
client.flush(timeout=30)
pid = os.fork()  # as a DataLoader worker is forked
if pid == 0:
    # The child inherits the client: it must get a fresh sender, not a broken one.
    exp.log_metrics({"child": 1.0}, step=1)
    client.flush(timeout=30)
    os._exit(0)
exp.log_metrics({"parent": 2.0}, step=2)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
m = exp.metrics()
assert m["parent"].steps == [0, 2], m
assert m["child"].steps == [1], m
client.close(timeout=10)
print("fork ok")
"""


def test_a_forked_child_gets_a_working_client(mboxd):
    # A fresh interpreter, as a training script is: one client, then fork.
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, mboxd.addr], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fork ok" in out.stdout


def test_system_metrics_arrive_at_the_set_interval(mboxd):
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="system", namespace="t")
    sampler = exp.start_system_metrics(interval_s=0.2)
    time.sleep(1.5)
    sampler.stop()
    m = exp.metrics()
    assert sampler.active and sampler.prefix == f"system/{mbox.system.node_name()}/"
    for name in ("cpu_percent", "process_rss_bytes", "memory_used_bytes", "memory_percent"):
        key = sampler.prefix + name
        series = m[key]
        assert len(series.steps) >= 5, key
        assert series.steps == list(range(len(series.steps)))
        gaps = [b - a for a, b in zip(series.wallclocks, series.wallclocks[1:])]
        assert all(150 <= g <= 400 for g in gaps), (key, gaps)
    assert 0 < m[sampler.prefix + "process_rss_bytes"].values[0] < 1 << 40
    client.close(timeout=5)
