/*
 * The room list (GET /chat/room): create a room (POST /chat/room), live user counts (polls
 * GET /chat/rooms every few seconds), enter a room (/chat/room/enter/{roomId}).
 */
(function () {
  'use strict';

  const POLL_MS = 3000;
  const list = document.getElementById('rooms');
  const empty = document.getElementById('no-rooms');
  const status = document.getElementById('status');
  const form = document.getElementById('create-room');
  let timer = null;

  function roomHref(roomId) {
    return '/chat/room/enter/' + encodeURIComponent(roomId);
  }

  function roomItem(room) {
    const li = document.createElement('li');
    li.className = 'room';
    li.dataset.roomId = room.roomId;
    const link = document.createElement('a');
    link.className = 'room-link';
    link.href = roomHref(room.roomId);
    const name = document.createElement('span');
    name.className = 'room-name';
    const count = document.createElement('span');
    count.className = 'room-count';
    count.title = 'People in this room';
    const enter = document.createElement('span');
    enter.className = 'room-enter';
    enter.textContent = 'Enter';
    link.append(name, count, enter);
    li.append(link);
    return li;
  }

  /* Update the list in place (no flicker, focus kept), in the server's order. */
  function render(rooms) {
    const existing = new Map();
    for (const li of list.children) {
      existing.set(li.dataset.roomId, li);
    }
    let previous = null;
    for (const room of rooms) {
      let li = existing.get(room.roomId);
      existing.delete(room.roomId);
      if (!li) {
        li = roomItem(room);
      }
      li.querySelector('.room-name').textContent = room.name;
      const count = Number(room.userCount) || 0;
      li.querySelector('.room-count').textContent = String(count);
      li.classList.toggle('busy', count > 0);
      const next = previous ? previous.nextSibling : list.firstChild;
      if (next !== li) {
        list.insertBefore(li, next);
      }
      previous = li;
    }
    for (const li of existing.values()) {
      li.remove();
    }
    empty.hidden = rooms.length > 0;
  }

  async function refresh() {
    try {
      render(await Chat.api('/chat/rooms'));
      status.textContent = '';
      document.body.dataset.state = 'ready';
    } catch (err) {
      status.textContent = 'Could not load the rooms (' + err.message + '); retrying…';
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (!document.hidden) {
        await refresh();
      }
      schedule();
    }, POLL_MS);
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const input = form.elements.name;
    const name = input.value.trim();
    if (!name) {
      return;
    }
    const button = form.querySelector('button');
    button.disabled = true;
    try {
      const room = await Chat.postForm('/chat/room', {name: name});
      input.value = '';
      status.textContent = 'Room “' + room.name + '” created.';
      await refresh();
    } catch (err) {
      status.textContent = 'Could not create the room: ' + err.message;
    } finally {
      button.disabled = false;
    }
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      refresh();
    }
  });

  (async function main() {
    const identity = new Chat.Identity();
    refresh();
    schedule();
    try {
      await identity.resolve();
    } catch (err) {
      status.textContent = 'Could not reach the server: ' + err.message;
    }
  })();
})();
