// Drives the legacy stompjs 2.3.3 (Jeff Mesnil's stomp.js, what the Spring chat pages load) in Node 20.
// It offers accept-version 1.1,1.0, so it negotiates STOMP 1.1.
// Argument: {"url": "...", "scenario": "chat" | "transaction" | "ack" | "heartbeats", "transport": "ws" | "overWS"}
//   transport "ws"     Stomp.over(new WebSocket(url, ['v10.stomp', 'v11.stomp'])) with the `ws` package
//                      (the subprotocols Stomp.client() offers in a browser);
//   transport "overWS" the library's own Node helper Stomp.overWS(url) (the `websocket` package, no
//                      subprotocol offered).
import Stomp from 'stompjs';
import { args, finish, fail, sleep, waitFor, WebSocket, emit } from './lib.mjs';

const url = args.url;

function open() {
  const client = args.transport === 'overWS' ? Stomp.overWS(url)
    : Stomp.over(new WebSocket(url, ['v10.stomp', 'v11.stomp']));
  client.debug = null;
  client.heartbeat.outgoing = 0;
  client.heartbeat.incoming = 0;
  const receipts = [];
  client.onreceipt = (frame) => receipts.push(frame.headers['receipt-id']);
  client.receipts = receipts;
  return client;
}

function connect(client, headers = {}) {
  return new Promise((resolve, reject) => {
    client.connect(headers, (frame) => resolve(frame), (err) => reject(new Error(
      `connect failed: ${typeof err === 'string' ? err : (err && err.headers ? err.headers.message : err)}`)));
  });
}

async function withReceipt(client, id, action) {
  action();
  await waitFor(() => client.receipts.includes(id), `receipt ${id}`);
}

const scenarios = {
  async chat() {
    const room = args.room || 'room-legacy';
    // stomp.js 2.3.3 only sends CONNECT from ws.onopen: connect() right after opening, as pages do.
    const a = open();
    const connected = await connect(a, { token: 'not-checked-by-anonymous-auth' });
    const b = open();
    await connect(b, {});
    const exact = [], all = [];
    await withReceipt(a, 's1', () => a.subscribe(`/sub/chat/room/${room}`, (m) => exact.push(m.body), { receipt: 's1' }));
    await withReceipt(a, 's2', () => a.subscribe('/sub/**', (m) => all.push(m.body), { receipt: 's2' }));
    const body = JSON.stringify({ type: 'ENTER', roomId: room, sender: 'old-client' });
    await withReceipt(b, 'p1', () => b.send('/pub/chat/message', { receipt: 'p1' }, body));
    await waitFor(() => exact.length === 1 && all.length === 1, 'messages');
    const protocol = a.ws.protocol === undefined ? null : a.ws.protocol;
    a.disconnect();
    b.disconnect();
    return { version: connected.headers.version, protocol, exact, all, sent: body };
  },

  async transaction() {
    const a = open();
    await connect(a);
    const got = [];
    await withReceipt(a, 's', () => a.subscribe('/sub/tx', (m) => got.push(m.body), { receipt: 's' }));
    const tx = a.begin('tx-1');
    a.send('/pub/echo', { transaction: tx.id, 'x-to': '/sub/tx' }, 'in-tx');
    await sleep(200);
    const beforeCommit = got.length;
    tx.commit();
    const tx2 = a.begin('tx-2');
    a.send('/pub/echo', { transaction: tx2.id, 'x-to': '/sub/tx' }, 'aborted');
    tx2.abort();
    await withReceipt(a, 'end', () => a.send('/pub/echo', { receipt: 'end', 'x-to': '/sub/tx' }, 'end'));
    await waitFor(() => got.includes('end'), 'end marker');
    a.disconnect();
    return { beforeCommit, got };
  },

  async ack() {
    const a = open();
    await connect(a);
    const got = [];
    await withReceipt(a, 's', () => a.subscribe('/sub/acks', (m) => { got.push(m.headers); m.ack(); },
      { receipt: 's', ack: 'client-individual' }));
    for (let i = 0; i < 3; i++) a.send('/pub/echo', { 'x-to': '/sub/acks' }, `m${i}`);
    await waitFor(() => got.length === 3, 'messages');
    await withReceipt(a, 'done', () => a.send('/pub/echo', { receipt: 'done', 'x-to': '/sub/none' }, 'x'));
    const connectedAfter = a.connected;
    a.disconnect();
    return { count: got.length, messageIds: got.map((h) => h['message-id']), connectedAfter };
  },

  async heartbeats() {
    const ms = args.ms || 200;
    const a = open();
    a.heartbeat.outgoing = ms;
    a.heartbeat.incoming = ms;
    let pongs = 0, pings = 0;
    a.debug = (msg) => { if (msg === '<<< PONG') pongs++; if (msg === '>>> PING') pings++; };
    const connected = await connect(a);
    await sleep(args.holdMs || 1500);
    const stillConnected = a.connected;
    a.disconnect();
    return { version: connected.headers.version, heartBeat: connected.headers['heart-beat'], pongs, pings,
      stillConnected };
  },
};

const scenario = scenarios[args.scenario];
if (!scenario) fail(new Error(`unknown scenario ${args.scenario}`));
emit({ event: 'start', scenario: args.scenario });
scenario().then(finish, fail);
