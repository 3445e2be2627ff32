"""Client message ids are unique per (room, sender, id) (issue 10), on SQLite and PostgreSQL.

The repository's set-based batch (one lookup, one counter advance, one INSERT) keys its lookup by the
sender too; the unique index of migration 0002 backs it. Room members are stored alongside.
"""

from __future__ import annotations

import pytest

from gateway.chat.models import MessageType, NewMessage
from gateway.chat.repository import ChatRepository, UnknownRoomError


def talk(room_id: str, text: str, sender: str, cid: str | None) -> NewMessage:
    return NewMessage(room_id=room_id, type=MessageType.TALK, sender=sender, message=text, client_msg_id=cid)


async def test_another_senders_id_is_stored_and_a_repeat_returns_the_original(repo: ChatRepository) -> None:
    room = await repo.create_room("ids")
    (alice,) = await repo.save_messages([talk(room.room_id, "alice's", "alice", "m-1")])
    (bob,) = await repo.save_messages([talk(room.room_id, "bob's", "bob", "m-1")])
    assert not alice.duplicate and not bob.duplicate
    assert (alice.message.seq, bob.message.seq) == (1, 2)
    (again,) = await repo.save_messages([talk(room.room_id, "alice edited", "alice", "m-1")])
    assert again.duplicate and again.message == alice.message
    stored = await repo.history(room.room_id)
    assert [(m.sender, m.message) for m in stored] == [("alice", "alice's"), ("bob", "bob's")]


async def test_one_batch_with_equal_ids_from_two_senders(repo: ChatRepository) -> None:
    room = await repo.create_room("batch")
    results = await repo.save_batch([talk(room.room_id, "a1", "alice", "k"), talk(room.room_id, "b1", "bob", "k"),
                                     talk(room.room_id, "a2", "alice", "k"), talk(room.room_id, "b2", "bob", "k")])
    assert [(r.duplicate, r.message.message) for r in results if not isinstance(r, Exception)] == [
        (False, "a1"), (False, "b1"), (True, "a1"), (True, "b1")]
    assert [m.message for m in await repo.history(room.room_id)] == ["a1", "b1"]


async def test_members_are_stored_per_room(repo: ChatRepository) -> None:
    room = await repo.create_room("members", creator="alice")
    other = await repo.create_room("no creator")
    assert await repo.members(room.room_id) == ["alice"]
    assert await repo.members(other.room_id) == []
    assert await repo.add_member(room.room_id, "bob") is True
    assert await repo.add_member(room.room_id, "bob") is False    # already a member
    assert await repo.is_member(room.room_id, "bob") and not await repo.is_member(other.room_id, "bob")
    assert [r.room_id for r in await repo.rooms_of("bob")] == [room.room_id]
    assert await repo.memberships([(room.room_id, "alice"), (room.room_id, "carol"), (other.room_id, "alice")]) == {
        (room.room_id, "alice")}
    assert await repo.remove_member(room.room_id, "bob") is True
    assert await repo.remove_member(room.room_id, "bob") is False
    with pytest.raises(UnknownRoomError):
        await repo.add_member("no-such-room", "bob")
