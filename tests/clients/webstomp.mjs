// Drives webstomp-client 1.2.6 (Node 20 + ws) against a gateway and reports what it observed.
// webstomp-client offers the subprotocols in the order v10.stomp, v11.stomp, v12.stomp and then
// speaks whatever version the server's chosen subprotocol names (accept-version from ws.protocol).
// Argument: {"url": "...", "scenario": "chat" | "transaction" | "ack" | "heartbeats"}
import webstomp from 'webstomp-client';
import { args, finish, fail, sleep, waitFor, WebSocket, emit } from './lib.mjs';

const url = args.url;
const PROTOCOLS = webstomp.VERSIONS.supportedProtocols();   // ['v10.stomp', 'v11.stomp', 'v12.stomp']

function open(options = {}) {
  const ws = new WebSocket(url, PROTOCOLS);
  const client = webstomp.over(ws, { debug: false, heartbeat: false, protocols: PROTOCOLS, ...options });
  const receipts = [];
  client.onreceipt = (frame) => receipts.push(frame.headers['receipt-id']);
  client.receipts = receipts;
  return client;
}

function connect(client, headers = {}) {
  return new Promise((resolve, reject) => {
    client.connect(headers, (frame) => resolve(frame), (err) => reject(new Error(
      `connect failed: ${err && err.headers ? err.headers.message : (err && err.code)}`)));
  });
}

async function withReceipt(client, id, action) {
  action();
  await waitFor(() => client.receipts.includes(id), `receipt ${id}`);
}

const scenarios = {
  async chat() {
    const room = args.room || 'room-w';
    const a = open();
    const b = open();
    const connected = await connect(a, { login: 'alice' });
    await connect(b, { login: 'bob' });
    const exact = [], pattern = [];
    await withReceipt(a, 's1', () => a.subscribe(`/sub/chat/room/${room}`, (m) => exact.push(m.body), { receipt: 's1' }));
    await withReceipt(a, 's2', () => a.subscribe('/sub/chat/room/*', (m) => pattern.push(m.body), { receipt: 's2' }));
    const body = JSON.stringify({ type: 'TALK', roomId: room, sender: 'bob', message: '안녕 ✓' });
    await withReceipt(b, 'p1', () => b.send('/pub/chat/message', body, { receipt: 'p1', 'content-type': 'application/json' }));
    await waitFor(() => exact.length === 1 && pattern.length === 1, 'messages');
    const protocol = a.ws.protocol;
    a.disconnect();
    b.disconnect();
    return { protocol, version: connected.headers.version, heartBeat: connected.headers['heart-beat'],
      userName: connected.headers['user-name'], exact, pattern, sent: body };
  },

  async transaction() {
    const a = open();
    await connect(a);
    const got = [];
    await withReceipt(a, 's', () => a.subscribe('/sub/tx', (m) => got.push(m.body), { receipt: 's' }));
    const tx = a.begin();
    a.send('/pub/echo', 'in-tx', { transaction: tx.id, 'x-to': '/sub/tx' });
    await sleep(200);
    const beforeCommit = got.length;
    tx.commit();
    const tx2 = a.begin();
    a.send('/pub/echo', 'aborted', { transaction: tx2.id, 'x-to': '/sub/tx' });
    tx2.abort();
    await withReceipt(a, 'end', () => a.send('/pub/echo', 'end', { receipt: 'end', 'x-to': '/sub/tx' }));
    await waitFor(() => got.includes('end'), 'end marker');
    a.disconnect();
    return { beforeCommit, got };
  },

  async ack() {
    const a = open();
    await connect(a);
    const got = [];
    await withReceipt(a, 's', () => a.subscribe('/sub/acks', (m) => { got.push(m.headers); m.ack(); },
      { receipt: 's', ack: 'client' }));
    for (let i = 0; i < 3; i++) a.send('/pub/echo', `m${i}`, { 'x-to': '/sub/acks' });
    await waitFor(() => got.length === 3, 'messages');
    await withReceipt(a, 'done', () => a.send('/pub/echo', 'x', { receipt: 'done', 'x-to': '/sub/none' }));
    const connectedAfter = a.connected;
    a.disconnect();
    return { count: got.length, ackHeaders: got.map((h) => h.ack), connectedAfter };
  },

  async heartbeats() {
    const ms = args.ms || 200;
    const a = open({ heartbeat: { outgoing: ms, incoming: ms } });
    let pongs = 0;
    a.hasDebug = true;
    a.debug = (msg) => { if (msg === '<<< PONG') pongs++; };
    const connected = await connect(a);
    let closed = false;
    a.ws.addEventListener('close', () => { closed = true; });
    await sleep(args.holdMs || 1500);
    const stillConnected = a.connected && !closed;
    a.disconnect();
    return { heartBeat: connected.headers['heart-beat'], pongs, stillConnected };
  },
};

const scenario = scenarios[args.scenario];
if (!scenario) fail(new Error(`unknown scenario ${args.scenario}`));
emit({ event: 'start', scenario: args.scenario });
scenario().then(finish, fail);
