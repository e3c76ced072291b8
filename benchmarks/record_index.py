"""What an open ArrayRecord shard costs a reading process per record, and how fast it reads at random.

tagjax writes one record per chunk (``group_size:1``, tagjax.records.write_shard) so grain can read any
record without decoding its neighbours. The reader (array_record's ``ArrayRecordReader``, opened by
``grain.sources.ArrayRecordDataSource`` with ``readahead_buffer_size:0`` and a 32 kB file buffer, one
per shard, kept open) holds the shard's chunk index: with ``index_storage_option:in_memory`` (the
default) it decodes the footer once and keeps one 8-byte offset per chunk; with ``offloaded`` it keeps
no offsets and instead re-reads and decodes the whole footer chunk (one entry per record) for every
offset it needs, twice per record read, so a read costs in proportion to the records in the shard.

For each (records per shard, shards read, index option) it writes one shard of small records (a 64-byte
image, a label, a post id: ~110 B on disk) with tagjax.records.write_shard unless cached under --root,
then in a fresh process opens it through ``grain.sources.ArrayRecordDataSource`` as
tagjax.input_pipeline.RecordSource does (the same file listed k times stands for k shards: one reader,
index and file descriptor each), or through tagjax.records.BoundedShardReader (at most K readers
open, the least recently used closed: ``config.data.max_open_shards``), and measures:

* anonymous memory (RssAnon: what the process owns, not the page cache) once the source is built
  (it opened every shard once to count its records) and ``malloc_trim(0)`` returned the heap the
  allocator kept but no longer uses, then after one read per shard (every reader open, its index
  loaded), trimmed again, and after N random reads in batches of 256 (``__getitems__``, as
  RecordSource.load reads a batch), and the file descriptors held per shard;
* random reads/s over those batches, and one at a time (``source[i]``).

Run (~3 min on one core; slow cases are cut at --max-seconds)::

    python benchmarks/record_index.py --root /tmp/tagjax-record-index --out /tmp/record_index.json

The table it printed on this project's build machine is in docs/scaling.md ("The record reader's
chunk index"), with the machine and the load.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tagjax import records

BATCH = 256


def anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def write(path: Path, n: int) -> None:
    """One shard of ``n`` small records, written by tagjax.records.write_shard as ``tagjax build`` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = bytes(64)
    records.write_shard(
        path, (records.encode(records.Record(f"{i:09d}", image, (i % 1000,))) for i in range(n))
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def child(path: str, copies: int, options: dict, reads: int, max_seconds: float) -> dict:
    import grain
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    out = {"before": anon_mb()}
    # ``copies`` > 1: the same file as that many shards (one reader, index and descriptor each), so
    # the cost of a host reading from many shards is measured without writing them all.
    if "max_open_shards" in options:
        source = records.BoundedShardReader([path] * copies, int(options["max_open_shards"]))
    else:
        source = grain.sources.ArrayRecordDataSource([path] * copies, options or None)
    n = len(source)
    out["built"] = anon_mb()
    # Counting the records opened every shard once, in threads: what those left on the heap is not
    # what the open readers hold.
    trim(0)
    out["built_trimmed"] = anon_mb()
    rng = np.random.default_rng(0)
    fds = open_fds()
    for shard in range(copies):  # one read per shard: every reader open, its index loaded
        first = source[shard * (n // copies) + int(rng.integers(n // copies))]
        assert records.decode(first).labels
    out["first_read"] = anon_mb()
    out["fds_per_shard"] = (open_fds() - fds) / copies
    trim(0)
    out["trimmed"] = anon_mb()
    keys = rng.integers(0, n, reads)
    start, done = time.perf_counter(), 0
    while done < reads and time.perf_counter() - start < max_seconds:
        batch = [int(k) for k in keys[done : done + BATCH]]
        assert len(source.__getitems__(batch)) == len(batch)
        done += len(batch)
    out["batched_reads"] = done
    out["batched_per_s"] = done / (time.perf_counter() - start)
    out["after_reads"] = anon_mb()
    trim(0)
    out["after_reads_trimmed"] = anon_mb()
    start, done = time.perf_counter(), 0
    while done < reads // 4 and time.perf_counter() - start < max_seconds / 2:
        source[int(keys[done])]
        done += 1
    out["single_per_s"] = done / (time.perf_counter() - start)
    return out


def measure(root: Path, n: int, copies: int, options: dict, reads: int, max_s: float) -> dict:
    path = root / f"n{n}.array_record"
    if not path.is_file():
        write(path, n)
    args = [str(path), str(copies), json.dumps(options), str(reads), str(max_s)]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "records": n,
        "shards": copies,
        "options": options,
        "shard_bytes": path.stat().st_size,
        **result,
    }


def render(rows: list[dict]) -> str:
    lines = [
        "| records per shard x shards | index | RssAnon MB: +open (one read per shard, from the "
        "source built and trimmed) "
        "| +open after malloc_trim | B/record resident (trimmed) | +after N random reads (trimmed) "
        "| random reads/s, batches of 256 | one at a time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opened = r["first_read"] - r["built_trimmed"]
        trimmed = r["trimmed"] - r["built_trimmed"]
        reads = r["after_reads_trimmed"] - r["trimmed"]
        index = r["options"].get("index_storage_option", "in_memory")
        if "max_open_shards" in r["options"]:
            index = (
                f"in_memory, at most {r['options']['max_open_shards']} open (BoundedShardReader)"
            )
        total = r["records"] * r["shards"]
        lines.append(
            f"| {r['records']:.0e} x {r['shards']} | {index} | {opened:+.1f} "
            f"| {trimmed:+.1f} | {trimmed * 2**20 / total:.1f} "
            f"| {reads:+.1f} ({r['batched_reads']:,} reads) "
            f"| {r['batched_per_s']:,.0f} | {r['single_per_s']:,.0f} |"
        )
    return "\n".join(lines)


# Serial reads (max_parallelism:0): each task of the reader's thread pool would decode the whole footer
# again (with the pool, a batch from one 10^6-record shard kept ~40 threads busy for minutes); the
# reader refuses a footer prefetch when offloaded.
OFFLOADED = {
    "index_storage_option": "offloaded",
    "footer_prefetch_bytes": "0",
    "max_parallelism": "0",
}

CASES = [  # (records per shard, shards read, reader options)
    (1_000_000, 1, {}),
    (1_000_000, 1, OFFLOADED),
    (100_000, 1, {}),
    (100_000, 1, OFFLOADED),
    (10_000, 1, {}),  # 10^4: `tagjax build`'s default --shard-size
    (10_000, 1, OFFLOADED),
    (10_000, 300, {}),
    (10_000, 300, OFFLOADED),
    (1_000, 1000, {}),
    (1_000, 1000, OFFLOADED),
    (10_000, 300, {"max_open_shards": "1"}),  # every read reopens its shard
    (10_000, 300, {"max_open_shards": "100"}),
    (100_000, 30, {"max_open_shards": "1"}),
]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, copies, options, reads, max_s = sys.argv[2:]
        result = child(path, int(copies), json.loads(options), int(reads), float(max_s))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/tagjax-record-index"))
    parser.add_argument("--reads", type=int, default=20_000, help="random reads per case")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per case and read mode")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--render", type=Path, default=None, help="only print the table of a --out")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    rows = []
    for n, copies, options in CASES:
        rows.append(measure(args.root, n, copies, options, args.reads, args.max_seconds))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
