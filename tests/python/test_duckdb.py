"""DuckDB reads the published files with hive partitioning and no other set-up:
exact counts and values, partition columns, and per-file sort order."""

import datetime

import duckdb
import pytest

from harness import Mboxd


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


def test_duckdb_reads_hive_partitioned_metrics_and_events(full, tmp_path):
    pb2, pb2_grpc = full
    server = Mboxd(tmp_path / "data", ["--roll-max-age-ms", "100000"])
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
    metrics = f"read_parquet('{root}/metrics/**/*.parquet', hive_partitioning=true)"
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
    assert types["step"] == "UBIGINT" and types["value_double"] == "DOUBLE"
    assert types["ingested_at"] == "TIMESTAMP WITH TIME ZONE"

    # Every file is sorted by (experiment_id, key, step).
    unsorted = con.execute(f"""
        SELECT count(*) FROM (
          SELECT experiment_id AS e, key AS k, step AS s,
                 lag(experiment_id) OVER w AS pe, lag(key) OVER w AS pk, lag(step) OVER w AS ps
          FROM read_parquet('{root}/metrics/**/*.parquet', filename=true, file_row_number=true)
          WINDOW w AS (PARTITION BY filename ORDER BY file_row_number))
        WHERE pe IS NOT NULL AND (e < pe OR (e = pe AND (k < pk OR (k = pk AND s < ps))))
    """).fetchone()[0]
    assert unsorted == 0

    events = f"read_parquet('{root}/events/**/*.parquet', hive_partitioning=true)"
    ev_rows = con.execute(
        f"SELECT namespace, experiment_id, name, source, epoch(wallclock)::BIGINT, "
        f"json_extract(metadata, '$.nested.list[1]')::VARCHAR FROM {events} ORDER BY wallclock").fetchall()
    assert ev_rows == [("vision", a, f"e{i}", "trainer", 1_700_000_000 + i, '"x"') for i in range(5)]
