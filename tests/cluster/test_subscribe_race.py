"""The subscribe race (issue 9): a SUBSCRIBE's RECEIPT is sent only after the node's Redis
subscription to the room's channel is confirmed and the room's baseline seq was read, so a message
committed on ANOTHER node right after the RECEIPT reaches the subscriber.

Two real gateway processes and a real redis-server, with CPU burners beside them so that the Redis
SUBSCRIBE round trip and the publication keep arriving close together. Four lanes run concurrently,
each a subscriber session on node 1 and a sender session on node 0; each iteration subscribes on
node 1 to a room nobody on node 1 serves yet (its channel is not subscribed), waits for the RECEIPT,
at once SENDs one TALK on node 0, and waits for that TALK on node 1; then it UNSUBSCRIBEs, so node 1
drops the channel again.

Checked by mutation (a patched copy of the gateway, not committed): with every Redis SUBSCRIBE
delayed by 0.3 s the test passes while the RECEIPT waits for the confirmation, and fails at its first
iteration when ``RedisBroker.subscribe`` also returns without waiting. Without the delay that
mutation alone is not caught: the room's baseline read before the RECEIPT yields to the event loop
long enough for the broker's link to send its SUBSCRIBE first. The periodic head check that would repair a missed message in a quiet room
is pushed out to an hour here: a message missed because of the race would never arrive, and the
iteration fails at its deadline instead of being healed silently.

No timing assertions: the per-event deadline only turns a hang or a miss into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.conftest import ROOM_PREFIX, Cluster, chat_body

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

ITERATIONS = 100         # in all, over LANES concurrent subscriber/sender pairs
LANES = 4
TIME_BUDGET_S = 150.0    # stop early (with at least MIN_ITERATIONS done) rather than overrun CI
MIN_ITERATIONS = 30
EVENT_TIMEOUT_S = 30.0   # per awaited frame; a message lost to the race never comes


@contextlib.contextmanager
def cpu_burners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """One busy-looping Python process per CPU (at most 4) while the block runs; each is killed and
    reaped through its own handle afterwards, whatever happened in the block."""
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(min(os.cpu_count() or 2, 4)):
            burners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait(10)


async def race_lane(cluster: Cluster, lane: int, stop_at: float) -> int:
    """One subscriber session on node 1 and one sender session on node 0 running iterations one
    after another until the lane's share is done or the time budget is spent; returns the count."""
    subscriber = await cluster.client(1)
    sender = await cluster.client(0, login=f"sam{lane}")
    done = 0
    for i in range(ITERATIONS // LANES):
        if done >= MIN_ITERATIONS // LANES and time.monotonic() > stop_at:
            break
        tag = f"{lane}-{i}"
        room = await cluster.create_room(f"race {tag}")
        await subscriber.send_frame("SUBSCRIBE", {"id": tag, "destination": ROOM_PREFIX + room, "receipt": f"sub-{tag}"})
        receipt = await subscriber.next_frame(EVENT_TIMEOUT_S)
        assert receipt.command == "RECEIPT" and receipt.get("receipt-id") == f"sub-{tag}", receipt
        # Right after the RECEIPT: committed on the other node, delivered through Redis.
        await sender.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": f"send-{tag}"},
                                chat_body(room, f"race {tag}"))
        stored = await sender.next_frame(EVENT_TIMEOUT_S)
        assert stored.command == "RECEIPT" and stored.get("receipt-id") == f"send-{tag}", stored
        try:
            message = await subscriber.next_frame(EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"iteration {tag}: the message committed after the SUBSCRIBE's RECEIPT "
                                 f"never reached node 1 (room {room})") from None
        assert message.command == "MESSAGE" and message.get("subscription") == tag, message
        body = json.loads(message.body)
        assert (body["message"], body["seq"], message.get("x-seq")) == (f"race {tag}", 1, "1"), body
        await subscriber.send_frame("UNSUBSCRIBE", {"id": tag, "receipt": f"unsub-{tag}"})
        gone = await subscriber.next_frame(EVENT_TIMEOUT_S)
        assert gone.command == "RECEIPT" and gone.get("receipt-id") == f"unsub-{tag}", gone
        done += 1
    return done


@pytest.mark.timeout(300)
async def test_a_message_sent_right_after_the_subscribe_receipt_always_arrives(cluster_factory: Any) -> None:
    cluster = await cluster_factory(2, settings={"room_head_check_s": 3600, "redis_timeout_s": 10,
                                                        "send_rate_per_s": 0})
    with cpu_burners() as burners:
        assert all(b.poll() is None for b in burners)
        stop_at = time.monotonic() + TIME_BUDGET_S
        done = await asyncio.gather(*(race_lane(cluster, lane, stop_at) for lane in range(LANES)))
        assert all(b.poll() is None for b in burners), "a CPU burner died early: the load was not there"
    assert sum(done) >= MIN_ITERATIONS, done
