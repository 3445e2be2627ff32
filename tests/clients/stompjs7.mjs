// Drives @stomp/stompjs 7.5.0 (Node 20 + ws) against a gateway and reports what it observed.
// Argument: {"url": "ws://.../ws-stomp/websocket", "scenario": "...", ...}
// Scenarios:
//   chat        two clients; B SENDs ChatMessage JSON to /pub/chat/message, A receives it on
//               /sub/chat/room/<room>, on the pattern /sub/chat/room/* and on /sub/**; receipts.
//   transaction SEND inside begin/commit arrives after commit; inside begin/abort never.
//   ack         client-individual subscription; message.ack()/nack() accepted (no ERROR).
//   binary      binaryBody (not UTF-8) through /pub/echo comes back byte-identical.
//   big         a body of args.size bytes through /pub/echo (the server's frame limit raised).
//   split       splitLargeFrames with maxWebSocketChunkSize: a large SEND in many WS messages.
//   heartbeats  heartbeatIncoming/Outgoing = args.ms; counts server beats over args.holdMs and
//               checks the connection survives on the client's own beats.
//   error       SEND to /sub/... (rejected by default): onStompError gets ERROR, socket closes 1002.
//   connect     only connects; reports the CONNECTED headers and the chosen subprotocol.
//   room        the real chat domain: A subscribes to /sub/chat/room/<room>, B SENDs a TALK to
//               /pub/chat/message; reports every payload A got until that TALK arrived.
//   resume      one subscriber to /sub/chat/room/<room> that survives its node's death: it tracks the
//               x-seq header of every MESSAGE; the Client reconnects (to the next of args.urls) and
//               re-subscribes with x-resume-after:<last x-seq seen>, after waiting until the room's
//               lastSeq (GET args.httpUrl/chat/room/<room>) is args.minGap past it. Events:
//               subscribed, received (args.killAfter messages), resumed {after, url}; ends at the
//               TALK whose text is args.doneText and reports every MESSAGE received.
import { Client } from '@stomp/stompjs';
import { args, finish, fail, sleep, waitFor, WebSocket, headersOf, emit } from './lib.mjs';

const url = args.url;

function makeClient(extra = {}) {
  const log = [];
  const client = new Client({
    webSocketFactory: () => new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    debug: (msg) => log.push(msg),
    ...extra,
  });
  client.log = log;
  return client;
}

function connect(client, headers = {}) {
  return new Promise((resolve, reject) => {
    client.connectHeaders = headers;
    client.onConnect = (frame) => resolve(frame);
    client.onStompError = (frame) => reject(new Error(`STOMP ERROR ${frame.headers.message}`));
    client.onWebSocketError = (evt) => reject(new Error(`websocket error ${evt.message || evt}`));
    client.activate();
  });
}

function receipt(client, id) {
  return new Promise((resolve) => client.watchForReceipt(id, (frame) => resolve(frame.headers['receipt-id'])));
}

async function subscribed(client, destination, onMessage, headers = {}) {
  const id = `rcpt-sub-${Math.random().toString(36).slice(2)}`;
  const got = receipt(client, id);
  const sub = client.subscribe(destination, onMessage, { ...headers, receipt: id });
  await got;
  return sub;
}

const scenarios = {
  async connect() {
    const a = makeClient();
    const frame = await connect(a, { login: args.login || 'alice' });
    const protocol = a.webSocket.protocol;
    await a.deactivate();
    return { connected: headersOf(frame), protocol };
  },

  async chat() {
    const room = args.room || 'room-1';
    const a = makeClient();
    const b = makeClient();
    const connectedA = await connect(a, { login: 'alice' });
    await connect(b, { login: 'bob' });
    const exact = [], pattern = [], all = [];
    await subscribed(a, `/sub/chat/room/${room}`, (m) => exact.push({ body: m.body, headers: m.headers }));
    await subscribed(a, '/sub/chat/room/*', (m) => pattern.push(m.body));
    await subscribed(a, '/sub/**', (m) => all.push(m.body));
    const receipts = [];
    for (let i = 0; i < 3; i++) {
      const id = `send-${i}`;
      const got = receipt(b, id);
      b.publish({ destination: '/pub/chat/message', headers: { receipt: id, 'content-type': 'application/json' },
        body: JSON.stringify({ type: 'TALK', roomId: room, sender: 'bob', message: `hi ${i}` }) });
      receipts.push(await got);
    }
    await waitFor(() => exact.length === 3 && pattern.length === 3 && all.length === 3, 'messages');
    await a.deactivate();
    await b.deactivate();
    return { version: connectedA.headers.version, protocol: null, exact, pattern, all, receipts,
      userName: connectedA.headers['user-name'] };
  },

  async room() {
    const room = args.room;
    const a = makeClient();
    const b = makeClient();
    await connect(a, { login: 'alice' });
    await connect(b, { login: 'bob' });
    const got = [];
    await subscribed(a, `/sub/chat/room/${room}`, (m) => got.push({ headers: m.headers, payload: JSON.parse(m.body) }));
    const sent = receipt(b, 'talk');
    b.publish({ destination: '/pub/chat/message', headers: { receipt: 'talk', 'content-type': 'application/json' },
      body: JSON.stringify({ type: 'TALK', roomId: room, sender: 'ignored', message: args.text }) });
    await sent;
    await waitFor(() => got.some((m) => m.payload.type === 'TALK' && m.payload.message === args.text), 'TALK');
    await a.deactivate();
    await b.deactivate();
    return { got };
  },

  async transaction() {
    const a = makeClient();
    await connect(a);
    const got = [];
    await subscribed(a, '/sub/tx', (m) => got.push(m.body));
    const tx = a.begin();
    a.publish({ destination: '/pub/echo', headers: { transaction: tx.id, 'x-to': '/sub/tx' }, body: 'in-tx-1' });
    a.publish({ destination: '/pub/echo', headers: { transaction: tx.id, 'x-to': '/sub/tx' }, body: 'in-tx-2' });
    await sleep(200);
    const beforeCommit = got.length;
    const committed = receipt(a, 'commit-1');
    a.commit(tx.id);
    // stompjs's ITransaction.commit() sends no receipt; send a marker with a receipt after it
    a.publish({ destination: '/pub/echo', headers: { receipt: 'commit-1', 'x-to': '/sub/tx' }, body: 'after-commit' });
    await committed;
    const tx2 = a.begin();
    a.publish({ destination: '/pub/echo', headers: { transaction: tx2.id, 'x-to': '/sub/tx' }, body: 'aborted' });
    tx2.abort();
    const last = receipt(a, 'end');
    a.publish({ destination: '/pub/echo', headers: { receipt: 'end', 'x-to': '/sub/tx' }, body: 'end' });
    await last;
    await waitFor(() => got.includes('end'), 'end marker');
    await a.deactivate();
    return { beforeCommit, got };
  },

  async ack() {
    const a = makeClient();
    await connect(a);
    const got = [];
    await subscribed(a, '/sub/acks', (m) => { got.push(m.headers); if (got.length % 2) m.ack(); else m.nack(); },
      { ack: 'client-individual' });
    for (let i = 0; i < 4; i++) {
      a.publish({ destination: '/pub/echo', headers: { 'x-to': '/sub/acks' }, body: `m${i}` });
    }
    await waitFor(() => got.length === 4, 'messages');
    const done = receipt(a, 'after-acks');
    a.publish({ destination: '/pub/echo', headers: { receipt: 'after-acks', 'x-to': '/sub/none' }, body: 'x' });
    await done;                 // the server handled the ACK/NACK frames without an ERROR
    const connectedAfter = a.connected;
    await a.deactivate();
    return { count: got.length, ackHeaders: got.map((h) => h.ack), connectedAfter };
  },

  async binary() {
    const a = makeClient();
    await connect(a);
    let received = null;
    await subscribed(a, '/sub/bin', (m) => { received = m; });
    const payload = new Uint8Array(4096);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7 + 255) % 256;
    a.publish({ destination: '/pub/echo', binaryBody: payload,
      headers: { 'x-to': '/sub/bin', 'content-type': 'application/octet-stream' } });
    await waitFor(() => received !== null, 'binary message');
    const back = received.binaryBody;
    const same = back.length === payload.length && back.every((v, i) => v === payload[i]);
    const isBinary = received.isBinaryBody;
    await a.deactivate();
    return { same, length: back.length, isBinary, contentType: received.headers['content-type'] };
  },

  async big() {
    const size = args.size || (1 << 20);
    const a = makeClient();
    await connect(a);
    let received = null;
    await subscribed(a, '/sub/big', (m) => { received = m.body; });
    const body = 'x'.repeat(size - 16) + '0123456789abcdef';
    a.publish({ destination: '/pub/echo', headers: { 'x-to': '/sub/big' }, body });
    await waitFor(() => received !== null, 'big message', 20000);
    await a.deactivate();
    return { length: received.length, same: received === body };
  },

  async split() {
    const size = args.size || 50000;
    const chunk = args.chunk || 1024;
    const a = makeClient({ splitLargeFrames: true, maxWebSocketChunkSize: chunk });
    await connect(a);
    let received = null;
    await subscribed(a, '/sub/split', (m) => { received = m.body; });
    const body = Array.from({ length: size }, (_, i) => String.fromCharCode(97 + (i % 26))).join('');
    a.publish({ destination: '/pub/echo', headers: { 'x-to': '/sub/split' }, body });
    await waitFor(() => received !== null, 'split message');
    const chunks = a.log.filter((l) => l.startsWith('chunk sent')).length;
    await a.deactivate();
    return { same: received === body, chunks };
  },

  async heartbeats() {
    const ms = args.ms || 200;
    let serverBeats = 0;
    let lost = 0;
    let closed = null;
    const a = makeClient({ heartbeatIncoming: ms, heartbeatOutgoing: ms,
      onHeartbeatReceived: () => { serverBeats++; }, onHeartbeatLost: () => { lost++; } });
    const frame = await connect(a);
    a.onWebSocketClose = (evt) => { closed = evt.code; };
    await sleep(args.holdMs || 2000);
    const pings = a.log.filter((l) => l === '>>> PING').length;
    const stillConnected = a.connected && closed === null;
    await a.deactivate();
    return { heartBeatHeader: frame.headers['heart-beat'], serverBeats, pings, lost, stillConnected };
  },

  async resume() {
    const room = args.room;
    const received = [];
    const subscribeHeaders = [];
    let lastSeq = null;       // the highest x-seq received so far, over every connection
    let sockets = 0;
    let url = null;
    let done = false;
    const client = makeClient({
      reconnectDelay: 200,
      webSocketFactory: () => {
        url = args.urls[Math.min(sockets, args.urls.length - 1)];
        sockets += 1;
        return new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']);
      },
      beforeConnect: async () => {
        if (lastSeq === null) return;
        // Let the room move on while this client is away, so that the resume has work to do.
        const end = Date.now() + 60000;
        while ((await roomHead()) < lastSeq + args.minGap) {
          if (Date.now() > end) fail(new Error('the room did not move on while the client was away'));
          await sleep(20);
        }
      },
    });
    async function roomHead() {
      const response = await fetch(`${args.httpUrl}/chat/room/${encodeURIComponent(room)}`);
      return (await response.json()).lastSeq;
    }
    client.onStompError = (frame) => fail(new Error(`STOMP ERROR ${frame.headers.message}`));
    client.onConnect = () => {
      // This is all a client needs to resume: the last x-seq it saw, as a SUBSCRIBE header.
      const resumeAfter = lastSeq;
      const headers = { receipt: `sub-${sockets}` };
      if (resumeAfter !== null) headers['x-resume-after'] = String(resumeAfter);
      subscribeHeaders.push({ ...headers });
      client.watchForReceipt(headers.receipt, () => {
        emit(resumeAfter === null ? { event: 'subscribed', url } : { event: 'resumed', after: resumeAfter, url });
      });
      client.subscribe(`/sub/chat/room/${room}`, (m) => {
        const body = JSON.parse(m.body);
        const xseq = Number(m.headers['x-seq']);
        received.push({ xseq, seq: body.seq, id: body.id, clientMsgId: body.clientMsgId ?? null,
          message: body.message });
        lastSeq = lastSeq === null ? xseq : Math.max(lastSeq, xseq);
        if (received.length === args.killAfter) emit({ event: 'received', count: received.length, lastSeq });
        if (body.message === args.doneText) done = true;
      }, headers);
    };
    client.activate();
    await waitFor(() => done, 'the last message', (args.timeoutMs || 20000) - 1000);
    await client.deactivate();
    return { received, subscribeHeaders, sockets };
  },

  async error() {
    const a = makeClient();
    await connect(a);
    const result = await new Promise((resolve) => {
      let error = null;
      a.onStompError = (frame) => { error = { message: frame.headers.message, receiptId: frame.headers['receipt-id'] }; };
      a.onWebSocketClose = (evt) => resolve({ error, closeCode: evt.code });
      a.publish({ destination: '/sub/chat/room/1', headers: { receipt: 'bad' }, body: 'x' });
    });
    await a.deactivate();
    return result;
  },
};

const scenario = scenarios[args.scenario];
if (!scenario) fail(new Error(`unknown scenario ${args.scenario}`));
emit({ event: 'start', scenario: args.scenario });
scenario().then(finish, fail);
