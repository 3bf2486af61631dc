"""Apache Spark (pyspark, local mode) reads the metrics table as written, and again
after compaction: step and wallclock_time are bigint (no unsigned types, so no
decimal(20,0)), the Hive partitions become columns, and per-experiment counts
equal DuckDB's."""

import os
import subprocess

import duckdb
import pytest

from harness import Mboxd, mboxd_binary

pyspark = pytest.importorskip("pyspark", reason="pyspark is installed by scripts/test.sh")


def block(pb2, parent, keys, n, first_step):
    b = pb2.MetricsBlock(parent_id=parent, keys=keys)
    b.key_index.extend(i % len(keys) for i in range(n))
    b.steps.extend(first_step + i for i in range(n))
    b.wallclock_times.extend(1_700_000_000_000 + first_step + i for i in range(n))
    b.values.extend(i * 0.25 for i in range(n))
    return b


@pytest.fixture(scope="module")
def spark():
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("mboxd-test")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "1")
               .config("spark.driver.memory", "512m")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def counts_by_spark(spark, root):
    df = spark.read.parquet(str(root / "metrics"))
    types = dict(df.dtypes)
    rows = {(r["namespace"], r["experiment_id"]): r["n"]
            for r in df.groupBy("namespace", "experiment_id").count().withColumnRenamed("count", "n").collect()}
    top = df.agg({"step": "max"}).collect()[0][0]
    return types, rows, top


def counts_by_duckdb(root):
    q = (f"SELECT namespace, experiment_id, count(*) FROM "
         f"read_parquet('{root}/metrics/**/*.parquet', hive_partitioning=true) GROUP BY ALL")
    return {(ns, e): n for ns, e, n in duckdb.sql(q).fetchall()}


def test_spark_reads_bigint_steps_with_duckdbs_counts(full, tmp_path, spark):
    pb2, pb2_grpc = full
    server = Mboxd(tmp_path / "data", ["--roll-max-age-ms", "100"])
    s = pb2_grpc.ModelStoreStub(server.channel)
    ids = {}
    for ns, name in [("cv", "a"), ("cv", "b"), ("nlp", "c")]:
        ids[name] = s.CreateExperiment(pb2.CreateExperimentRequest(name=name, namespace=ns)).experiment_id
    sizes = {"a": 3_000, "b": 1_234, "c": 777}
    for round_ in range(3):
        req = pb2.LogMetricsRequest(blocks=[
            block(pb2, ids[n], ["loss", "acc"], size, round_ * size) for n, size in sizes.items()])
        assert s.LogMetrics(req).points_accepted == sum(sizes.values())
    # A step far past 32 bits: it must come back as a number, not a decimal.
    s.LogMetrics(pb2.LogMetricsRequest(blocks=[block(pb2, ids["a"], ["far"], 1, 1 << 40)]))
    assert server.stop() == 0
    root = server.data_dir

    want = {("cv", ids["a"]): 9_001, ("cv", ids["b"]): 3 * 1_234, ("nlp", ids["c"]): 3 * 777}
    for stage in ("as written", "after compaction"):
        types, by_spark, top = counts_by_spark(spark, root)
        assert types["step"] == "bigint" and types["wallclock_time"] == "bigint", (stage, types)
        assert types["value_double"] == "double" and types["experiment_id"] == "string"
        assert by_spark == counts_by_duckdb(root) == want, stage
        assert top == 1 << 40
        if stage == "as written":
            done = subprocess.run([mboxd_binary(), "compact", "--daemon-id", "pytest", "--data-dir", str(root)],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "2 partitions" in done.stdout, done.stdout
