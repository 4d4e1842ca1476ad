"""A bucket's store alone: small fragments as files (one each, the path of streamed Puts
and of every fragment before volumes) against needles in a volume (group commit).

    python scripts/bench_store.py                      # 2,000 x 11 KiB, 8 at a time
    python scripts/bench_store.py --size 64K --count 500 --concurrency 32

Both run in one process, one after the other, on the same disk, fsync on: fragments/s,
CPU per fragment (process time, all threads) and fsyncs issued, and the ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import anyio

from karma8.bucket.store import FragmentStore, open_store
from karma8.config import parse_size
from karma8.core.checksums import unit_crcs

UNIT = 512 * 1024


async def _files(store: FragmentStore, fid: str, data: bytes, crcs: list[int]) -> None:
    async with store.open_writer(fid, len(data), UNIT) as writer:
        await writer.write(data, crcs)
        await writer.commit()


async def _needles(store: FragmentStore, fid: str, data: bytes, crcs: list[int]) -> None:
    await store.put_whole(fid, data, UNIT, crcs)


async def _run(root: Path, how: str, count: int, size: int, concurrency: int) -> tuple[float, float, int]:
    store = await open_store(root, fsync=True)
    put = _files if how == "files" else _needles
    data = random.Random(1).randbytes(size)
    crcs = unit_crcs(data, UNIT)
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await put(store, f"{i:032x}.0", data, crcs)

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert store.usage().fragments == count
    batches = store.volumes.stats.batches
    store.close()
    return wall, cpu, batches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", default="11K", help="fragment size [11K: a 64 KiB file's part]")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="where to write [a temporary directory under /var/tmp]")
    args = parser.parse_args()
    size = int(str(parse_size(args.size)))
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="k8-bench-store-") as tmp:
        rows = {}
        for how in ("files", "needles"):
            rows[how] = anyio.run(_run, Path(tmp) / how, how, args.count, size, args.concurrency)
        print(f"{args.count} x {size:,} B fragments, {args.concurrency} at a time, fsync on")
        print(f"{'store':<10} {'fragments/s':>12} {'CPU us/frag':>12} {'fsync/frag':>11}")
        for how, (wall, cpu, batches) in rows.items():
            syncs = 2.0 if how == "files" else batches / args.count
            print(f"{how:<10} {args.count / wall:>12,.0f} {cpu / args.count * 1e6:>12,.0f} {syncs:>11.3f}")
        (fw, fc, _), (nw, nc, _) = rows["files"], rows["needles"]
        print(f"{'ratio':<10} {fw / nw:>11.2f}x {nc / fc:>11.2f}x")


if __name__ == "__main__":
    main()
