"""Storage ceiling: ``ChatRepository.save_batch`` driven directly, with no gateway around it.

``python -m bench.storage_ceiling --database-url URL --rooms-file FILE --batch-sizes 1,8,32,128
--seconds 2 [--writers 2]`` prints one JSON object: for each batch size, how many messages per
second ``writers`` concurrent loops of ``await repo.save_batch(batch)`` stored (one transaction per
batch, the way the gateway's group commit calls it: one writer per node, one batch in flight per
writer). Batches are shaped like the curve's traffic: message *k* of the run goes to room
``rooms[k % len(rooms)]``, so a batch of 32 over 500 rooms touches 32 rooms, over 10 rooms 10.

It runs as its own process (so it competes for the CPU like a gateway node does, not with the load
generator's event loop) and imports exactly two things from the gateway: ``ChatRepository`` with its
stable ``save_batch(list[NewMessage]) -> list[SaveResult | StorageError]`` and ``NewMessage``/
``MessageType``. The engine comes from ``gateway.chat.repository.make_engine`` when it exists (so the
SQLite pragmas are the gateway's own), else from SQLAlchemy directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _engine(url: str) -> Any:
    """The gateway's own engine set-up when ``make_engine(url)`` still exists with that signature."""
    try:
        from gateway.chat.repository import make_engine
        return make_engine(url)
    except (ImportError, TypeError):
        from sqlalchemy.ext.asyncio import create_async_engine
        return create_async_engine(url)


@dataclass
class _Tally:
    stored: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)


async def measure(url: str, rooms: list[str], batch_sizes: list[int], seconds: float, writers: int,
                  text_chars: int) -> dict[str, Any]:
    from gateway.chat.models import MessageType, NewMessage
    from gateway.chat.repository import ChatRepository

    engines = [_engine(url) for _ in range(writers)]
    repos = [ChatRepository(engine) for engine in engines]
    out: dict[str, Any] = {"writers": writers, "rooms": len(rooms), "seconds_per_size": seconds, "sizes": []}
    counter = 0
    pad = "x" * max(0, text_chars - 24)
    try:
        # Warm-up: open the pools' connections and the database's caches.
        for repo in repos:
            await repo.save_batch([NewMessage(rooms[0], MessageType.TALK, "ceiling", "warm-up " + pad)])
        for size in batch_sizes:
            tally = _Tally()
            stop_at = time.perf_counter() + seconds
            cpu0 = time.process_time()
            wall0 = time.perf_counter()

            async def writer(repo: ChatRepository, size: int, stop_at: float, tally: _Tally) -> None:
                nonlocal counter
                while time.perf_counter() < stop_at:
                    batch = []
                    for _ in range(size):
                        batch.append(NewMessage(rooms[counter % len(rooms)], MessageType.TALK, "ceiling",
                                                f"~c~{counter}:{pad}"))
                        counter += 1
                    t0 = time.perf_counter()
                    outcomes = await repo.save_batch(batch)
                    tally.latencies.append(time.perf_counter() - t0)
                    for outcome in outcomes:
                        if isinstance(outcome, Exception):
                            tally.refused += 1
                        else:
                            tally.stored += 1

            await asyncio.gather(*(writer(repo, size, stop_at, tally) for repo in repos))
            wall = time.perf_counter() - wall0
            latencies = sorted(tally.latencies)
            out["sizes"].append({
                "batch_size": size,
                "messages_per_s": round(tally.stored / wall, 1),
                "batches_per_s": round(len(latencies) / wall, 1),
                "commit_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
                "commit_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2)
                if latencies else None,
                "refused": tally.refused,
                "cpu_util": round((time.process_time() - cpu0) / wall, 3),
            })
    finally:
        for engine in engines:
            await engine.dispose()
    best = max(out["sizes"], key=lambda s: s["messages_per_s"]) if out["sizes"] else None
    out["best_messages_per_s"] = best["messages_per_s"] if best else None
    out["best_batch_size"] = best["batch_size"] if best else None
    return out


def _loop_factory() -> Any:
    """uvloop's loop, as uvicorn runs the gateway; the default loop without it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rooms-file", required=True, help="a JSON list of existing room ids")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--text-chars", type=int, default=64)
    args = parser.parse_args(argv)
    rooms = json.loads(Path(args.rooms_file).read_text())
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result = runner.run(measure(args.database_url, rooms, sizes, args.seconds, args.writers, args.text_chars))
    result["pid"] = os.getpid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
