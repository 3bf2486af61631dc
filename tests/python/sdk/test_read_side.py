"""The read side against a real mboxd: series queries (keys, step range, buckets,
pages) and run search (filter, order, pages, metadata and summaries, DataFrame).

Needs an mboxd that serves the GetMetrics and ListExperiments extensions (keys,
start_step/end_step, max_points, page tokens; filter, order_by, include_details);
test_requests.py checks what the SDK sends and reads independently of the binary."""

import time

import pytest

import mbox


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_metrics_by_keys_steps_and_buckets(mboxd):
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="series", namespace="read")
    for step in range(1000):
        exp.log_metrics({"loss": float(step), "acc": step / 1000, "note": f"s{step}"}, step=step)

    every = exp.metrics()
    assert sorted(every) == ["acc", "loss", "note"]
    assert every["loss"].steps == list(range(1000)) and every["loss"].values == [float(s) for s in range(1000)]
    assert every["note"].values[:2] == ["s0", "s1"]
    assert (every["loss"].min, every["loss"].max, every["loss"].total_points) == (None, None, 1000)

    only = exp.metrics(keys=["loss"])
    assert list(only) == ["loss"] and only["loss"].steps == list(range(1000))
    assert list(exp.metrics(keys="acc")) == ["acc"]

    window = exp.metrics(keys=["loss", "acc"], start_step=100, end_step=199)
    assert window["loss"].steps == list(range(100, 200))  # inclusive at both ends
    assert window["acc"].values[0] == pytest.approx(0.1)
    assert window["loss"].total_points == 100 and not window["loss"].bucketed
    assert exp.metrics(keys=["loss"], start_step=995)["loss"].steps == [995, 996, 997, 998, 999]
    assert exp.metrics(keys=["loss"], end_step=2)["loss"].steps == [0, 1, 2]

    buckets = exp.metrics(keys=["loss"], max_points=10)["loss"]
    assert buckets.bucketed and buckets.total_points == 1000
    assert 1 <= len(buckets.steps) <= 10
    assert len(buckets.min) == len(buckets.max) == len(buckets.values) == len(buckets.steps)
    assert buckets.steps == sorted(buckets.steps) and buckets.steps[-1] == 999
    assert buckets.values == [float(s) for s in buckets.steps]  # each bucket's last point
    assert buckets.min[0] == 0.0 and buckets.max[-1] == 999.0
    assert all(lo <= v <= hi for lo, v, hi in zip(buckets.min, buckets.values, buckets.max))

    short = exp.metrics(keys=["loss"], start_step=0, end_step=4, max_points=10)["loss"]
    assert not short.bucketed and short.steps == [0, 1, 2, 3, 4]  # 5 points fit: exact
    client.close(timeout=10)


def test_metrics_follow_pages_of_a_long_series(mboxd):
    # 300,000 points at full precision are more than one page of mboxd's default size.
    client = mbox.Client(mboxd.addr)
    exp = client.new_experiment(name="long", namespace="read")
    n = 300_000
    for step in range(0, n, 1000):
        for s in range(step, step + 1000):
            exp.log_metrics({"x": s * 0.5}, step=s)
    series = exp.metrics()["x"]
    assert len(series.steps) == n
    assert series.steps == list(range(n)) and series.values[-1] == (n - 1) * 0.5
    client.close(timeout=10)


def runs(client):
    specs = [("resnet-a", 0.0003, [0.9, 0.4, 0.15]), ("resnet-b", 0.001, [0.8, 0.5, 0.3]),
             ("vit", 0.0003, [0.7, 0.2, 0.1])]
    made = {}
    for name, lr, losses in specs:
        exp = client.new_experiment(name=name, namespace="search", owner="me", task="classify")
        exp.update_metadata(key="lr", value=lr)
        exp.update_metadata(key="optimizer", value={"name": "adamw", "betas": [0.9, 0.999]})
        for step, loss in enumerate(losses):
            exp.log_metrics({"val/loss": loss}, step=step * 100)
        made[name] = exp
    client.flush(timeout=30)
    return made


def test_search_filters_sorts_and_pages(mboxd):
    client = mbox.Client(mboxd.addr)
    made = runs(client)
    query = 'name ~ "resnet" and params.lr = 0.0003 and metrics.val/loss.last < 0.2'
    found = wait_for(lambda: list(client.search("search", filter=query)))
    assert [e.name for e in found] == ["resnet-a"]
    (run,) = found
    assert run.id == made["resnet-a"].id and run.task == "classify" and run.owner == "me"
    assert dict(run.metadata) == {"lr": 0.0003, "optimizer": {"name": "adamw", "betas": [0.9, 0.999]}}
    assert run.summaries["val/loss"] == mbox.MetricSummary(last=0.15, last_step=200, min=0.15, max=0.9, count=3)

    # Summaries appear as the writers publish, each run's in its own time: the
    # orderings below need all three.
    wait_for(lambda: [e.summaries["val/loss"].count for e in client.search("search")
                      if "val/loss" in e.summaries] == [3, 3, 3])
    order = ["metrics.val/loss.last ASC"]
    assert [e.name for e in client.search("search", order_by=order)] == ["vit", "resnet-a", "resnet-b"]
    assert [e.name for e in client.search("search", order_by=order, page_size=1)] == ["vit", "resnet-a", "resnet-b"]
    assert [e.name for e in client.search("search", order_by=order, limit=2)] == ["vit", "resnet-a"]
    assert [e.name for e in client.search("search", order_by=["metrics.val/loss.last DESC"], page_size=2,
                                          limit=2)] == ["resnet-b", "resnet-a"]
    assert list(client.search("search", filter='params.lr = 0.5')) == []
    client.close(timeout=10)


def test_search_df(mboxd, default_client_at):
    pytest.importorskip("pandas", reason="pandas is not installed")
    default_client_at(mboxd.addr)
    runs(mbox.default_client())
    frames = []
    # Summaries appear as the writers publish (within the roll age): wait for all three.
    wait_for(lambda: frames.append(mbox.search_df("search", order_by=["metrics.val/loss.last ASC"]))
             or (len(frames[-1]) == 3 and "metrics.val/loss.last" in frames[-1]
                 and frames[-1]["metrics.val/loss.last"].notna().all()))
    df = frames[-1]
    assert df["name"].tolist() == ["vit", "resnet-a", "resnet-b"]
    assert df["params.lr"].tolist() == [0.0003, 0.0003, 0.001]
    assert df["metrics.val/loss.last"].tolist() == [0.1, 0.15, 0.3]
    assert df["metrics.val/loss.count"].tolist() == [3, 3, 3]
    assert {"id", "owner", "created_at", "params.optimizer", "metrics.val/loss.min"} <= set(df.columns)
