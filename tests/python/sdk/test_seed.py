"""The seed document's calls, typed as written, against a real mboxd; every value
is read back through the API and from the Parquet files."""

import datetime

import duckdb
import pyarrow.dataset as ds

import mbox
from mbox import Event, EventSource, MLFramework


def test_the_seed_documents_calls_work_as_written(mboxd, default_client_at):
    default_client_at(mboxd.addr)

    # --- as in the seed ---
    experiment = mbox.new_experiment(
        name="yolo-v4", owner="foo@bar.com", namespace="cv", external_id="ext1", framework=MLFramework.PYTORCH
    )
    result = experiment.update_metadata(key="hyperparams", value={"fc_layers": 3, "lr": 0.0002})
    experiment.log_metrics(metrics={'loss': 2.4, 'accu': 97.6}, step=10, wallclock=12345)
    experiment.log_event(Event(name="checkpoint_started", source=EventSource(name="trainer"), wallclock_time = 12000 , metadata={"chk_size": 2345}))
    experiment.log_event(Event(name="checkpoint_finish", source=EventSource(name="trainer"), wallclock_time = 12500 , metadata={"write_speed": 2000}))
    # --- (torch.save() between the two events is the user's own) ---

    assert experiment.id == "2b2a19e145c92827d50144d50ee13c68"
    assert isinstance(result.updated_at, datetime.datetime) and result.num_keys_written == 1

    assert experiment.metadata() == {"hyperparams": {"fc_layers": 3.0, "lr": 0.0002}}
    metrics = experiment.metrics()
    assert sorted(metrics) == ["accu", "loss"]
    assert (metrics["loss"].steps, metrics["loss"].wallclocks, metrics["loss"].values) == ([10], [12345], [2.4])
    assert metrics["accu"].values == [97.6]
    events = experiment.events()
    assert [(e.name, e.source.name, e.wallclock_time, e.metadata) for e in events] == [
        ("checkpoint_started", "trainer", 12000, {"chk_size": 2345.0}),
        ("checkpoint_finish", "trainer", 12500, {"write_speed": 2000.0}),
    ]
    assert [e.id for e in mbox.experiments("cv")] == [experiment.id]
    assert mbox.experiment(experiment.id).name == "yolo-v4"

    mbox.close()
    assert mboxd.stop() == 0
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT namespace, experiment_id, key, step, wallclock_time, value_double "
        f"FROM read_parquet('{mboxd.data_dir}/metrics/**/*.parquet', hive_partitioning=true) ORDER BY key").fetchall()
    assert rows == [("cv", experiment.id, "accu", 10, 12345, 97.6), ("cv", experiment.id, "loss", 10, 12345, 2.4)]
    events = ds.dataset(f"{mboxd.data_dir}/events", format="parquet", partitioning="hive").to_table()
    assert events.column("name").to_pylist() == ["checkpoint_started", "checkpoint_finish"]
    assert [t.timestamp() for t in events.column("wallclock").to_pylist()] == [12.0, 12.5]
    assert events.column("metadata").to_pylist() == ['{"chk_size":2345.0}', '{"write_speed":2000.0}']
