/*
 * The room page (GET /chat/room/enter/{roomId}).
 *
 * - Connects with SockJS + @stomp/stompjs to /ws-stomp and subscribes to /sub/chat/room/{roomId}; the
 *   server announces ENTER/QUIT. Reconnects with exponential back-off (0.5 s doubling to 10 s, plus
 *   jitter) and re-subscribes:
 *   - on a reconnect, when it has shown a seq, with the header `x-resume-after:<last seq shown>`: the
 *     server first sends every message of the room after that seq, then live ones (no REST call);
 *   - if the server refuses the resume (an ERROR for that SUBSCRIBE, e.g. "more than N messages
 *     behind"; the server then closes the session), the page loads what it missed from the history
 *     and its next connection subscribes without the header;
 *   - otherwise (first connection, or after a refused resume), once the SUBSCRIBE's RECEIPT confirms
 *     the subscription, it fetches what it missed from GET /chat/room/{roomId}/messages?after=<last seq shown>.
 * - Messages carry a per-room `seq`. The page shows them strictly in seq order and exactly once:
 *   duplicates (same seq) are dropped, and a message arriving after a gap waits until the gap is
 *   filled from the history endpoint. Messages without a seq (published by a Spring node) are shown
 *   as they come.
 * - Sending: each message gets a clientMsgId (UUID, also sent as the `client-msg-id` header) and stays
 *   in the outbox until it comes back from the server; after a reconnect the outbox is sent again and
 *   the server stores a retried message only once.
 * - Query parameters: `transports=xhr-streaming,xhr-polling` forces SockJS transports (tests);
 *   `transports=raw` uses the plain WebSocket endpoint /ws-stomp/websocket without SockJS.
 *
 * Every user-supplied string is rendered with textContent, never as HTML.
 */
(function () {
  'use strict';

  const PAGE_SIZE = 200;             // history page size (the server may cap it lower)
  const MAX_RENDERED = 1000;         // messages kept in the DOM
  const OPEN_WINDOW = 200;           // a room opens with at most its last this-many messages
  const ROOM_POLL_MS = 5000;         // user count refresh (counts also come with every message)
  const GAP_RETRY_MS = 1000;         // a gap the history does not fill yet is retried this often...
  const GAP_GIVE_UP = 5;             // ...this many times before the later messages are shown anyway
  const MAX_SEND_ATTEMPTS = 5;       // resends of one outbox message over reconnects

  const roomId = decodeURIComponent(window.location.pathname.split('/').pop() || '');
  const params = new URLSearchParams(window.location.search);
  const forced = (params.get('transports') || '').split(',').map((s) => s.trim()).filter(Boolean);

  const el = {
    name: document.getElementById('room-name'),
    connection: document.getElementById('connection'),
    count: document.getElementById('user-count'),
    notice: document.getElementById('notice'),
    log: document.getElementById('log'),
    messages: document.getElementById('messages'),
    outbox: document.getElementById('outbox'),
    composer: document.getElementById('composer'),
    text: document.getElementById('text'),
  };

  const identity = new Chat.Identity();
  let lastSeq = 0;                   // highest seq shown; everything up to it is shown
  const waiting = new Map();         // seq -> message received beyond a gap
  const outbox = new Map();          // clientMsgId -> {body, li, attempts}
  let gapTries = 0;
  let gapTimer = null;
  let catchingUp = null;
  let catchUpAgain = false;
  let client = null;
  let subscription = null;
  let connects = 0;
  let subscribedOnce = false;        // a SUBSCRIBE was confirmed before: the next one is a reconnect
  let resumeReceipt = null;          // receipt id of the SUBSCRIBE in flight that carries x-resume-after
  let resumeRefused = false;         // the server refused that resume: catch up over REST instead

  // --- status ------------------------------------------------------------------------------------

  function setState(state, text) {
    document.body.dataset.state = state;
    el.connection.textContent = text;
    el.connection.className = 'connection ' + state;
  }

  function notify(text) {
    el.notice.textContent = text;
  }

  function setCount(value) {
    const count = Number(value);
    if (Number.isFinite(count) && count >= 0) {
      el.count.textContent = String(count);
    }
  }

  // --- rendering ---------------------------------------------------------------------------------

  function nearBottom() {
    return el.log.scrollHeight - el.log.scrollTop - el.log.clientHeight < 80;
  }

  function scrollDown() {
    el.log.scrollTop = el.log.scrollHeight;
  }

  function messageItem(msg) {
    const li = document.createElement('li');
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = msg.message == null ? '' : String(msg.message);
    if (msg.type === 'ENTER' || msg.type === 'QUIT') {
      li.className = 'msg notice ' + msg.type.toLowerCase();
      li.append(text);
    } else {
      li.className = 'msg talk' + (msg.sender === identity.name ? ' mine' : '');
      const meta = document.createElement('div');
      meta.className = 'meta';
      const sender = document.createElement('span');
      sender.className = 'sender';
      sender.textContent = msg.sender == null ? '' : String(msg.sender);
      const time = document.createElement('time');
      time.textContent = Chat.formatTime(msg.createdAt);
      if (msg.createdAt) {
        time.dateTime = String(msg.createdAt);
        time.title = new Date(msg.createdAt).toLocaleString();
      }
      meta.append(sender, time);
      text.className = 'text bubble';
      li.append(meta, text);
    }
    if (typeof msg.seq === 'number') {
      li.dataset.seq = String(msg.seq);
    }
    if (msg.id != null) {
      li.dataset.id = String(msg.id);
    }
    return li;
  }

  function show(msg) {
    const stick = nearBottom();
    el.messages.append(messageItem(msg));
    while (el.messages.childElementCount > MAX_RENDERED) {
      el.messages.firstElementChild.remove();
    }
    if (msg.clientMsgId && outbox.has(msg.clientMsgId)) {
      outbox.get(msg.clientMsgId).li.remove();
      outbox.delete(msg.clientMsgId);
    }
    if (stick || msg.sender === identity.name) {
      scrollDown();
    }
  }

  /* Every message, live or from history, goes through here. */
  function accept(msg) {
    if (!msg || msg.roomId !== roomId) {
      return;
    }
    if (typeof msg.seq !== 'number') {
      show(msg);            // from a Spring node: not persisted, no sequence
      return;
    }
    if (msg.seq <= lastSeq || waiting.has(msg.seq)) {
      return;               // already shown or already waiting: a duplicate
    }
    waiting.set(msg.seq, msg);
    drain();
  }

  function drain() {
    while (waiting.has(lastSeq + 1)) {
      const msg = waiting.get(lastSeq + 1);
      waiting.delete(lastSeq + 1);
      lastSeq += 1;
      show(msg);
    }
    el.messages.dataset.lastSeq = String(lastSeq);
    if (waiting.size === 0) {
      gapTries = 0;
      clearTimeout(gapTimer);
      gapTimer = null;
    } else if (gapTimer === null) {
      gapTimer = setTimeout(repairGap, gapTries === 0 ? 0 : GAP_RETRY_MS);
    }
  }

  async function repairGap() {
    await catchUp();
    gapTimer = null;
    if (waiting.size === 0) {
      return;
    }
    gapTries += 1;
    if (gapTries >= GAP_GIVE_UP) {
      // The missing seqs are not in the database: show what came after them rather than stall.
      lastSeq = Math.min.apply(null, Array.from(waiting.keys())) - 1;
      gapTries = 0;
    }
    drain();
  }

  /* Fetch everything after the last shown seq, page by page, until the history has no more. */
  function catchUp() {
    if (catchingUp) {
      catchUpAgain = true;
      return catchingUp;
    }
    catchingUp = (async () => {
      do {
        catchUpAgain = false;
        let after = lastSeq;
        for (;;) {
          const page = await Chat.api('/chat/room/' + encodeURIComponent(roomId) +
                                      '/messages?after=' + after + '&limit=' + PAGE_SIZE);
          if (!Array.isArray(page) || page.length === 0) {
            break;
          }
          for (const msg of page) {
            accept(msg);
            if (typeof msg.seq === 'number' && msg.seq > after) {
              after = msg.seq;
            }
          }
          if (page.length && page[page.length - 1].userCount != null && !client?.connected) {
            setCount(page[page.length - 1].userCount);
          }
        }
      } while (catchUpAgain);
    })();
    return catchingUp.catch((err) => {
      notify('Could not load the history: ' + err.message);
    }).finally(() => {
      catchingUp = null;
    });
  }

  // --- sending -----------------------------------------------------------------------------------

  function outboxItem(text) {
    const li = document.createElement('li');
    li.className = 'msg talk mine pending';
    const meta = document.createElement('div');
    meta.className = 'meta';
    const state = document.createElement('span');
    state.className = 'sending';
    state.textContent = 'sending…';
    meta.append(state);
    const body = document.createElement('span');
    body.className = 'text bubble';
    body.textContent = text;
    li.append(meta, body);
    return li;
  }

  function transmit(id) {
    const entry = outbox.get(id);
    if (!entry || !client || !client.connected || entry.failed) {
      return;
    }
    if (entry.attempts >= MAX_SEND_ATTEMPTS) {
      fail(id, 'not sent after ' + MAX_SEND_ATTEMPTS + ' attempts');
      return;
    }
    entry.attempts += 1;
    const receipt = 'send-' + id + '-' + entry.attempts;
    client.watchForReceipt(receipt, () => {
      entry.li.querySelector('.sending').textContent = 'sent';
    });
    entry.receipt = receipt;
    client.publish({
      destination: '/pub/chat/message',
      headers: {'client-msg-id': id, receipt: receipt, 'content-type': 'application/json'},
      body: JSON.stringify(entry.body),
    });
  }

  function fail(id, reason) {
    const entry = outbox.get(id);
    if (!entry) {
      return;
    }
    entry.failed = true;
    entry.li.classList.add('failed');
    const state = entry.li.querySelector('.sending');
    state.textContent = 'not sent: ' + reason + ' ';
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.className = 'link';
    retry.textContent = 'retry';
    retry.onclick = () => {
      entry.failed = false;
      entry.attempts = 0;
      entry.li.classList.remove('failed');
      state.textContent = 'sending…';
      transmit(id);
    };
    state.append(retry);
  }

  el.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = el.text.value;
    if (!text.trim()) {
      return;
    }
    if (text.length > 4000) {
      notify('A message can have at most 4000 characters.');
      return;
    }
    const id = Chat.uuid();
    const li = outboxItem(text);
    outbox.set(id, {body: {type: 'TALK', roomId: roomId, message: text, clientMsgId: id}, li: li, attempts: 0});
    el.outbox.append(li);
    scrollDown();
    el.text.value = '';
    el.text.focus();
    transmit(id);
  });

  // --- connection --------------------------------------------------------------------------------

  function socket() {
    if (forced.length === 1 && forced[0] === 'raw') {
      const scheme = window.location.protocol === 'https:' ? 'wss://' : 'ws://';
      return new WebSocket(scheme + window.location.host + '/ws-stomp/websocket', ['v12.stomp', 'v11.stomp', 'v10.stomp']);
    }
    return new SockJS('/ws-stomp', null, forced.length ? {transports: forced} : {});
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function onMessage(frame) {
    let msg;
    try {
      msg = JSON.parse(frame.body);
    } catch (e) {
      return;
    }
    if (msg && msg.userCount != null) {
      setCount(msg.userCount);
    }
    accept(msg);
  }

  function connect() {
    client = new StompJs.Client({
      webSocketFactory: socket,
      reconnectDelay: 500,
      maxReconnectDelay: 10000,
      reconnectTimeMode: StompJs.ReconnectionTimeMode.EXPONENTIAL,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
      connectionTimeout: 10000,
      debug: () => {},
      beforeConnect: async (c) => {
        if (connects > 0) {
          setState('reconnecting', 'reconnecting…');
          await sleep(Math.random() * 300);   // spread a node's clients over the survivors
        }
        connects += 1;
        c.connectHeaders = await identity.connectHeaders();
      },
      onConnect: () => {
        const receipt = 'sub-' + connects;
        const headers = {receipt: receipt};
        // A reconnect resumes after the last seq shown: the server sends what was missed, then
        // live messages, in order. Duplicates are dropped by seq in accept().
        const resume = subscribedOnce && lastSeq > 0 && !resumeRefused;
        if (resume) {
          headers['x-resume-after'] = String(lastSeq);
        }
        resumeReceipt = resume ? receipt : null;
        resumeRefused = false;
        client.watchForReceipt(receipt, () => {
          subscribedOnce = true;
          setState('connected', 'connected');
          notify('');
          if (!resume) {
            // Catch up only once the server confirms the subscription: from then on every new
            // message is delivered live, and everything before it is in the history.
            catchUp();
          }
        });
        subscription = client.subscribe('/sub/chat/room/' + roomId, onMessage, headers);
        for (const id of outbox.keys()) {
          transmit(id);
        }
      },
      onStompError: (frame) => {
        const message = frame.headers.message || 'error';
        const failedReceipt = frame.headers['receipt-id'];
        if (resumeReceipt !== null && (failedReceipt === resumeReceipt || /x-resume-after|messages behind/.test(message))) {
          // The server cannot resume this subscription (the page was away too long, or the
          // database is down) and closes the session: load the history now, and subscribe without
          // x-resume-after on the next connection (which catches up again after its RECEIPT).
          resumeReceipt = null;
          resumeRefused = true;
          setState('reconnecting', 'catching up…');
          catchUp();
          return;
        }
        if (failedReceipt) {
          for (const [id, entry] of outbox) {
            if (entry.receipt === failedReceipt) {
              fail(id, message);
            }
          }
        }
        if (message.indexOf('Authentication failed') === 0) {
          client.deactivate();
          identity.forget();
          setState('error', 'not logged in');
          identity.login(message).then(() => client.activate());
          return;
        }
        notify(message);
      },
      onWebSocketClose: () => {
        subscription = null;
        resumeReceipt = null;
        if (client.active) {
          setState('reconnecting', 'reconnecting…');
        }
      },
    });
    client.activate();
  }

  async function loadRoom() {
    try {
      const room = await Chat.api('/chat/room/' + encodeURIComponent(roomId));
      el.name.textContent = room.name;
      document.title = room.name + ' · Chat';
      setCount(room.userCount);
      if (typeof room.lastSeq === 'number' && lastSeq === 0 && room.lastSeq > OPEN_WINDOW) {
        // A big room: start near its end instead of paging through its whole history.
        lastSeq = room.lastSeq - OPEN_WINDOW;
      }
      return true;
    } catch (err) {
      if (err instanceof Chat.HttpError && err.status === 404) {
        el.name.textContent = 'No such room';
        setState('error', 'room not found');
        notify('This room does not exist. Go back to the room list.');
        el.composer.hidden = true;
        return false;
      }
      notify('Could not load the room: ' + err.message);
      return true;
    }
  }

  function pollRoom() {
    setTimeout(async () => {
      if (!document.hidden) {
        try {
          setCount((await Chat.api('/chat/room/' + encodeURIComponent(roomId))).userCount);
        } catch (e) { /* shown by the connection state */ }
      }
      pollRoom();
    }, ROOM_POLL_MS);
  }

  (async function main() {
    setState('connecting', 'connecting…');
    if (!await loadRoom()) {
      return;
    }
    try {
      await identity.resolve();   // first: the history marks the user's own messages
    } catch (err) {
      setState('error', 'offline');
      notify('Could not reach the server: ' + err.message);
      return;
    }
    setState('connecting', 'connecting…');
    catchUp();
    connect();
    pollRoom();
    window.addEventListener('pagehide', () => {
      if (client) {
        client.deactivate();
      }
    });
  })();

  // For tests and debugging in the console.
  window.chatRoom = {
    get lastSeq() { return lastSeq; },
    get connected() { return !!(client && client.connected); },
    get outbox() { return outbox.size; },
  };
})();
