"""The published tables read back with exact counts and values, partition columns,
int64 steps and per-row-group sort order: from a local root by DuckDB with hive partitioning and no
other set-up, and from an S3 root (a real s3s-fs server) through pyarrow's S3
filesystem, queried by the same DuckDB SQL."""

import datetime

import duckdb
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from harness import Mboxd, S3Server


def row_groups(f):
    """The (experiment_id, key, step) columns of each row group of a Parquet file."""
    return [f.read_row_group(g, columns=["experiment_id", "key", "step"]) for g in range(f.num_row_groups)]


def block(pb2, parent, keys, n, first_step, strings=()):
    b = pb2.MetricsBlock(parent_id=parent, keys=keys)
    b.key_index.extend(i % len(keys) for i in range(n))
    b.steps.extend(range(first_step, first_step + n))
    b.wallclock_times.extend(1_000 + first_step + i for i in range(n))
    b.values.extend((first_step + i) * 0.5 for i in range(n))
    for row, text in strings:
        b.string_rows.append(row)
        b.string_values.append(text)
    return b


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_published_tables_read_back_exactly(full, tmp_path, backend):
    pb2, pb2_grpc = full
    args = ["--roll-max-age-ms", "100000"]
    if backend == "s3":
        s3 = S3Server(tmp_path / "s3")
        config = tmp_path / "mboxd.toml"
        config.write_text(s3.storage_toml("team/runs"))
        args += ["--config", str(config)]
    server = Mboxd(tmp_path / "data", args)
    s = pb2_grpc.ModelStoreStub(server.channel)
    a = s.CreateExperiment(pb2.CreateExperimentRequest(name="a", namespace="vision")).experiment_id
    b = s.CreateExperiment(pb2.CreateExperimentRequest(name="b", namespace="vision")).experiment_id
    n = s.CreateExperiment(pb2.CreateExperimentRequest(name="n", namespace="nlp")).experiment_id
    # Descending first steps and interleaved experiments: the writer must sort.
    for first in (20_000, 10_000, 0):
        req = pb2.LogMetricsRequest(blocks=[
            block(pb2, b, ["loss", "acc"], 10_000, first),
            block(pb2, a, ["loss"], 10_000, first, strings=[(7, "seven")] if first == 0 else ()),
            block(pb2, n, ["ppl"], 10_000, first),
        ])
        assert s.LogMetrics(req).points_accepted == 30_000
    for i in range(5):
        ev = pb2.Event(name=f"e{i}", source=pb2.EventSource(name="trainer"))
        ev.wallclock_time.FromSeconds(1_700_000_000 + i)
        ev.metadata.metadata["i"].number_value = i
        ev.metadata.metadata["nested"].struct_value.update({"list": [1, "x"], "ok": True})
        s.LogEvent(pb2.LogEventRequest(parent_id=a, event=ev))
    assert server.stop() == 0

    root = server.data_dir
    today = datetime.datetime.now(datetime.timezone.utc).date()
    con = duckdb.connect()
    if backend == "local":
        metrics = f"read_parquet('{root}/metrics/**/*.parquet', hive_partitioning=true)"
        events = f"read_parquet('{root}/events/**/*.parquet', hive_partitioning=true)"
        experiments = f"read_parquet('{root}/experiments/*.parquet')"
        files = [row_groups(pq.ParquetFile(p)) for p in sorted(root.glob("metrics/**/*.parquet"))]
    else:
        # A graceful stop uploads everything: nothing is left in the spool.
        assert not list((root / "spool").rglob("*.parquet"))
        fs = s3.filesystem()

        def dataset(table):
            # Listed, not opened as a directory: s3s-fs answers HEAD on a prefix
            # with 500 (S3 itself answers 404), which pyarrow's directory probe
            # does not expect.
            base = f"runs/team/runs/{table}"
            listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            paths = sorted(i.path for i in listed if i.path.endswith(".parquet"))
            return pads.dataset(paths, filesystem=fs, format="parquet",
                                partitioning=pads.partitioning(flavor="hive"),
                                partition_base_dir=base)

        datasets = {table: dataset(table) for table in ("metrics", "events", "experiments")}
        for table, ds in datasets.items():
            con.register(f"{table}_s3", ds.to_table())
        metrics, events, experiments = "metrics_s3", "events_s3", "experiments_s3"
        files = [row_groups(pq.ParquetFile(f.path, filesystem=fs)) for f in datasets["metrics"].get_fragments()]
        s3.stop()
    assert con.execute(f"SELECT count(*) FROM {metrics}").fetchone()[0] == 90_000
    rows = con.execute(
        f"SELECT namespace, date, experiment_id, key, count(*), min(step), max(step) FROM {metrics} "
        "GROUP BY ALL ORDER BY ALL").fetchall()
    expected = sorted([
        ("nlp", today, n, "ppl", 30_000, 0, 29_999),
        ("vision", today, a, "loss", 30_000, 0, 29_999),
        ("vision", today, b, "acc", 15_000, 1, 29_999),
        ("vision", today, b, "loss", 15_000, 0, 29_998),
    ])
    assert [(ns, d if isinstance(d, datetime.date) else datetime.date.fromisoformat(str(d)), *rest)
            for ns, d, *rest in rows] == expected

    # Values: step i has value i/2 and wallclock 1000+i; one row holds a string.
    bad = con.execute(
        f"SELECT count(*) FROM {metrics} WHERE value_string IS NULL AND "
        "(value_double <> step * 0.5 OR wallclock_time <> 1000 + step)").fetchone()[0]
    assert bad == 0
    assert con.execute(
        f"SELECT experiment_id, key, step, value_double, value_string FROM {metrics} "
        "WHERE value_string IS NOT NULL").fetchall() == [(a, "loss", 7, None, "seven")]
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {metrics}").fetchall()}
    # int64: Spark, Delta Lake and Iceberg have no unsigned 64-bit type.
    assert types["step"] == "BIGINT" and types["wallclock_time"] == "BIGINT"
    assert types["value_double"] == "DOUBLE"
    assert types["ingested_at"] == "TIMESTAMP WITH TIME ZONE"

    # The experiments snapshot joins names to the metric rows. An experiment that
    # changed between two snapshot ticks has a row in each delta file: the latest
    # counts, as the README's queries do.
    latest = (f"(SELECT * FROM {experiments} QUALIFY row_number() OVER "
              "(PARTITION BY experiment_id ORDER BY updated_at DESC) = 1)")
    by_name = con.execute(
        f"SELECT e.namespace, e.name, count(*) FROM {metrics} m JOIN {latest} e "
        "USING (experiment_id) GROUP BY ALL ORDER BY ALL").fetchall()
    assert by_name == [("nlp", "n", 30_000), ("vision", "a", 30_000), ("vision", "b", 30_000)]

    # Every row group is sorted by (experiment_id, key, step) (compaction sorts
    # whole files).
    assert files and sum(t.num_rows for f in files for t in f) == 90_000
    for f in files:
        for t in f:
            rows = list(zip(*(t.column(c).to_pylist() for c in ("experiment_id", "key", "step"))))
            assert rows == sorted(rows)

    ev_rows = con.execute(
        f"SELECT namespace, experiment_id, name, source, epoch(wallclock)::BIGINT, "
        f"json_extract(metadata, '$.nested.list[1]')::VARCHAR FROM {events} ORDER BY wallclock").fetchall()
    assert ev_rows == [("vision", a, f"e{i}", "trainer", 1_700_000_000 + i, '"x"') for i in range(5)]
