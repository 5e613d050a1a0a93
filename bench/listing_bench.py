"""Listing benchmark: the parallel lister (jobs._listing.list_to_parquet) against one paginator
(emotion_core.storage.list_objects), on the same keys in moto's S3 server behind the 20 ms
latency proxy, in the same run, alternating, repeated.

    PYTHONPATH=$PWD .venv/bin/python -m bench.listing_bench --keys 100000 --prefixes 256 --repeats 3

Keys are ``p<NNN>/img_<NNNNNNN>.jpg`` spread evenly over ``--prefixes`` prefixes, uploaded
straight to moto (no proxy) with many threads. Shards are written to a local temporary folder.
Prints keys/s of both, the ratio per repeat, and the median with its min-max spread. The first
parallel run (Ray workers starting) is reported apart as the warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench import _common as C

BUCKET = "listing-bench"


def upload(endpoint: str, keys: list[str], threads: int) -> float:
    client = C.boto_client(endpoint, pool=threads)
    client.create_bucket(Bucket=BUCKET)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=b"x"), keys, chunksize=64))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--prefixes", type=int, default=256)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--upload-threads", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: all cores)")
    ap.add_argument("--threads", type=int, default=16, help="listings in flight per task")
    ap.add_argument("--prefixes-per-task", type=int, default=16)
    args = ap.parse_args(argv)

    import os

    os.environ.update(C.BENCH_ENV)
    keys = [f"p{i % args.prefixes:03d}/img_{i:07d}.jpg" for i in range(args.keys)]
    with C.s3_servers(args.delay_ms) as s3:
        secs = upload(s3.moto_endpoint, keys, args.upload_threads)
        print(f"uploaded {len(keys):,} keys over {args.prefixes} prefixes in {secs:.0f} s", flush=True)

        import ray

        from emotion_core import storage
        from jobs._listing import list_to_parquet

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        root = f"s3://{BUCKET}/"

        def parallel() -> float:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                result = list_to_parquet([root], out, threads=args.threads, prefixes_per_task=args.prefixes_per_task)
                secs = time.perf_counter() - t0
            assert result.rows == len(keys), (result.rows, len(keys))
            return secs

        def sequential() -> float:
            t0 = time.perf_counter()
            rows = storage.list_objects(root).num_rows
            secs = time.perf_counter() - t0
            assert rows == len(keys), (rows, len(keys))
            return secs

        print(f"warm-up parallel (workers starting): {len(keys) / parallel():,.0f} keys/s", flush=True)
        ratios = []
        for r in range(args.repeats):
            seq = sequential()
            par = parallel()
            ratios.append(seq / par)
            print(f"repeat {r + 1}: one paginator {len(keys) / seq:,.0f} keys/s ({seq:.1f} s), "
                  f"parallel {len(keys) / par:,.0f} keys/s ({par:.1f} s), ratio {seq / par:.2f}x "
                  f"(load {C.load_average()[0]:.1f})", flush=True)
        print(f"ratio parallel/one paginator: median {statistics.median(ratios):.2f}x, "
              f"min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} repeats "
              f"({len(keys):,} keys, {args.prefixes} prefixes, {args.delay_ms:.0f} ms proxy, "
              f"{os.cpu_count()} cores)", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
