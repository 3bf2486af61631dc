"""Caller-side cost of log_metrics and points/s delivered from one Python process.

    MBOX_ADDR=localhost:8085 python sdk/python/bench/bench_sdk.py

Needs a running mboxd (for example `cargo run --release -- serve --durability memory`).
"""

import statistics
import time

import mbox


def main(calls: int = 200_000, keys: int = 10):
    client = mbox.Client(buffer_points=5_000_000)
    exp = client.new_experiment(name="sdk-bench", namespace="bench")
    names = [f"train/metric_{k}" for k in range(keys)]
    metrics = {n: 0.5 for n in names}

    # Caller cost: per-call latency, sampled.
    samples = []
    started = time.perf_counter()
    for step in range(calls):
        t = time.perf_counter_ns()
        exp.log_metrics(metrics, step=step)
        if step % 16 == 0:
            samples.append(time.perf_counter_ns() - t)
    logged = time.perf_counter() - started
    client.flush(timeout=300)
    delivered = time.perf_counter() - started
    points = calls * keys
    print(f"log_metrics with {keys} keys: median {statistics.median(samples) / 1000:.2f} us, "
          f"p99 {sorted(samples)[int(len(samples) * 0.99)] / 1000:.2f} us per call")
    print(f"{points} points: logged in {logged:.2f}s, all acknowledged after {delivered:.2f}s "
          f"= {points / delivered:,.0f} points/s delivered")
    client.close()


if __name__ == "__main__":
    main()
