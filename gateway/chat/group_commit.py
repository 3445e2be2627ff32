"""Group commit: many concurrent ``save`` calls share one database transaction (one fsync).

Owns :class:`GroupCommitWriter`. One worker task takes whatever messages are waiting (up to
``batch_max``, the ``commit_batch_max`` setting) and stores them with
:meth:`ChatRepository.save_batch` in a single transaction. There is no artificial delay: while one
commit is in flight the next callers queue up, so the batch size grows with the load by itself.

Guarantees:

* a caller's future resolves only after the transaction holding its message has committed, with its
  own :class:`SaveResult` (or its own :class:`StorageError`, e.g. unknown room: a refused message
  never fails the others in its batch);
* if the batch's transaction fails because the database is unavailable (refused or lost
  connections, a lock or statement timeout, ``batch_timeout_s`` passed), every caller of the batch
  gets :class:`DatabaseUnavailable` at once: nothing was stored and a retry is safe; a burst of such
  failures is logged as one line when it starts and one when the database answers again;
* if the batch's transaction fails otherwise (a database error one message can cause), each message
  of it is retried alone in its own transaction, so that message fails only its own caller;
* a caller cancelled before its batch starts is not stored; one cancelled later may be stored;
* if a failure hits the COMMIT itself (connection lost mid-commit) the outcome is unknown and the
  one-by-one retry may store a message twice; only a ``client_msg_id`` makes that retry idempotent;
* :meth:`GroupCommitWriter.stop` refuses new saves and drains every queued message before returning
  (or, past its timeout, fails what is left with :class:`WriterClosedError`);
* ``on_commit`` (when given) sees every committed batch, in commit order and before any of its
  callers' futures resolve: the chat service publishes and delivers from it, so a room's messages
  leave this node in ``seq`` order.

Callers either ``await save(message)`` or take the future of :meth:`submit` (a pipelined session keeps
several in flight; abandoning such a future never withdraws its message). :meth:`reserve` is the
node's backpressure: it waits while ``max_pending`` messages are submitted and not yet committed, so
a caller that reserves before submitting (the chat service, on behalf of a session that then stops
reading its socket) can never grow the queue past that bound.

Metrics (:mod:`gateway.metrics`): messages committed, the batch size and duration of each successful
transaction, failed transactions by reason.

It must not import the chat service, the broker, STOMP or transport code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.chat.models import NewMessage, SaveResult
from gateway.chat.repository import ChatRepository, DatabaseUnavailable, StorageError, is_unavailable
from gateway.metrics import (
    COMMIT_BATCH,
    COMMIT_DURATION,
    COMMITS_FAILED,
    COMMITS_UNAVAILABLE,
    MESSAGES_COMMITTED,
)

log = logging.getLogger(__name__)


class WriterClosedError(RuntimeError):
    """The writer is not running (not started, stopping or stopped); the message was not stored."""


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters since start: ``batches`` group commits, ``transactions`` write transactions in all
    (a batch retried message by message counts one per retry), ``messages`` outcomes delivered,
    ``largest_batch`` messages in the biggest batch, ``isolated_batches`` batches that fell back to
    one transaction per message."""

    batches: int = 0
    transactions: int = 0
    messages: int = 0
    largest_batch: int = 0
    isolated_batches: int = 0


@dataclass(slots=True)
class _Pending:
    message: NewMessage
    future: asyncio.Future[SaveResult]


_STOP = object()

CommitListener = Callable[[Sequence[tuple[NewMessage, SaveResult]]], None]
"""Called with one committed batch's stored messages (duplicates included), in batch order."""


class GroupCommitWriter:
    """Batches concurrent :meth:`save` calls into group commits on ``repository``."""

    def __init__(self, repository: ChatRepository, *, batch_max: int, max_pending: int | None = None,
                 on_commit: CommitListener | None = None, batch_timeout_s: float | None = None) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._repository = repository
        self._batch_max = batch_max
        self._max_pending = max_pending
        self.on_commit = on_commit
        self._pending = 0
        self._room = asyncio.Event()      # set while fewer than max_pending are pending
        self._room.set()
        self._batch_timeout_s = batch_timeout_s
        self._refused = 0                 # messages refused in the current unavailability burst
        self.unavailable_batches = 0
        self._queue: asyncio.Queue[_Pending | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._batches = 0
        self._transactions = 0
        self._messages = 0
        self._largest = 0
        self._isolated = 0

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def stats(self) -> WriterStats:
        return WriterStats(batches=self._batches, transactions=self._transactions, messages=self._messages,
                           largest_batch=self._largest, isolated_batches=self._isolated)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("GroupCommitWriter already started")
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="group-commit-writer")

    @property
    def pending(self) -> int:
        """Messages submitted and not yet committed (or failed)."""
        return self._pending

    async def reserve(self) -> None:
        """Wait until fewer than ``max_pending`` messages are pending (at once when unbounded)."""
        while self._max_pending is not None and self._pending >= self._max_pending and self._accepting:
            self._room.clear()
            await self._room.wait()

    def submit(self, message: NewMessage) -> asyncio.Future[SaveResult]:
        """Queue ``message`` for the next group commit; the future resolves after that commit.

        Its exception is :class:`StorageError` if the message is refused, or the database error if
        its transaction failed. Raises :class:`WriterClosedError` at once if the writer is not
        running. Cancelling the future before its batch starts withdraws the message.
        """
        if not self._accepting:
            raise WriterClosedError("the message writer is not running")
        future: asyncio.Future[SaveResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(message, future))
        self._pending += 1
        return future

    async def save(self, message: NewMessage) -> SaveResult:
        """:meth:`submit` and wait for the outcome."""
        return await self.submit(message)

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new saves, commit everything queued, then end the worker.

        With ``timeout`` (seconds), give up waiting after it: the worker is cancelled and the callers
        still waiting get :class:`WriterClosedError`.
        """
        task = self._task
        if task is None or task.done():
            self._accepting = False
            return
        if self._accepting:
            self._accepting = False
            self._room.set()  # release reservers: their submit now fails with WriterClosedError
            self._queue.put_nowait(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        batch: list[_Pending] = []
        try:
            stopping = False
            while not stopping:
                item = await self._queue.get()
                if item is _STOP:
                    break
                assert isinstance(item, _Pending)
                batch = [item]
                while len(batch) < self._batch_max:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    assert isinstance(item, _Pending)
                    batch.append(item)
                await self._commit(batch)
                batch = []
        finally:
            self._fail_leftovers(batch)

    def _fail_leftovers(self, batch: list[_Pending]) -> None:
        leftovers = list(batch)
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, _Pending):
                leftovers.append(item)
        for pending in leftovers:
            self._settled(1)
            if not pending.future.done():
                pending.future.set_exception(WriterClosedError("the message writer stopped before commit"))

    def _settled(self, count: int) -> None:
        self._pending -= count
        if self._max_pending is None or self._pending < self._max_pending:
            self._room.set()

    async def _commit(self, batch: list[_Pending]) -> None:
        live = [pending for pending in batch if not pending.future.done()]
        self._settled(len(batch) - len(live))
        if not live:
            return
        self._batches += 1
        self._largest = max(self._largest, len(live))
        self._transactions += 1
        try:
            outcomes = await self._save([pending.message for pending in live])
        except Exception as exc:
            if is_unavailable(exc):
                self._unavailable(live, exc)
                return
            COMMITS_FAILED.inc()
            if len(live) == 1:
                self._deliver(live[0], exc)
                return
            log.warning("group commit of %d messages failed (%s); retrying them one by one",
                        len(live), type(exc).__name__)
            self._isolated += 1
            for pending in live:
                await self._commit_alone(pending)
            return
        self._available()
        self._announce([(p.message, o) for p, o in zip(live, outcomes, strict=True) if isinstance(o, SaveResult)])
        for pending, outcome in zip(live, outcomes, strict=True):
            self._deliver(pending, outcome)

    async def _commit_alone(self, pending: _Pending) -> None:
        if pending.future.done():
            self._settled(1)
            return
        self._transactions += 1
        try:
            (outcome,) = await self._save([pending.message])
        except Exception as exc:
            if is_unavailable(exc):
                self._unavailable([pending], exc)
            else:
                COMMITS_FAILED.inc()
                self._deliver(pending, exc)
            return
        if isinstance(outcome, SaveResult):
            self._announce([(pending.message, outcome)])
        self._deliver(pending, outcome)

    async def _save(self, batch: list[NewMessage]) -> list[SaveResult | StorageError]:
        started = time.perf_counter()
        if self._batch_timeout_s is None:
            outcomes = await self._repository.save_batch(batch)
        else:
            async with asyncio.timeout(self._batch_timeout_s):
                outcomes = await self._repository.save_batch(batch)
        COMMIT_DURATION.observe(time.perf_counter() - started)
        COMMIT_BATCH.observe(len(batch))
        stored = sum(1 for outcome in outcomes if isinstance(outcome, SaveResult) and not outcome.duplicate)
        if stored:
            MESSAGES_COMMITTED.inc(stored)
        return outcomes

    def _unavailable(self, batch: list[_Pending], exc: BaseException) -> None:
        self.unavailable_batches += 1
        COMMITS_UNAVAILABLE.inc()
        if not self._refused:
            log.warning("database unavailable (%s: %s); SENDs are answered 'not stored, retry' until it "
                        "answers again", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        self._refused += len(batch)
        failure = DatabaseUnavailable(f"{type(exc).__name__}")
        for pending in batch:
            self._deliver(pending, failure)

    def _available(self) -> None:
        if self._refused:
            log.info("database available again; %d messages were refused while it was not", self._refused)
            self._refused = 0

    def _announce(self, committed: list[tuple[NewMessage, SaveResult]]) -> None:
        listener = self.on_commit
        if listener is None or not committed:
            return
        try:
            listener(committed)
        except Exception:
            log.exception("on_commit listener failed for a batch of %d messages", len(committed))

    def _deliver(self, pending: _Pending, outcome: SaveResult | StorageError | BaseException) -> None:
        self._messages += 1
        self._settled(1)
        if pending.future.done():
            return
        if isinstance(outcome, SaveResult):
            pending.future.set_result(outcome)
        else:
            pending.future.set_exception(outcome)
