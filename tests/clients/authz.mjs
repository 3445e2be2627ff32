// Drives @stomp/stompjs 7.5.0 (Node 20 + ws) through a list of steps and reports how the gateway
// answered each: the authorization tests (issue 10) use it to check refusals with a real client.
// Argument: {"url": "ws://.../ws-stomp/websocket", "connectHeaders": {...}, "steps": [...]}
// Steps, run in order, each with a receipt; the run stops at the first ERROR (the server closes):
//   {"op": "subscribe", "destination": "/sub/chat/room/<id>"}
//   {"op": "send", "room": "<id>", "message": "text", "clientMsgId": "optional", "sender": "optional"}
//   {"op": "wait", "text": "a TALK text"}   waits until a subscription of this client got that TALK
// Result: {"connected": headers | null, "connectError": message | null,
//          "steps": [{"op", "outcome": "receipt" | "error", "message"}], "received": [payload, ...]}
import { Client } from '@stomp/stompjs';
import { args, finish, fail, waitFor, WebSocket, headersOf } from './lib.mjs';

const client = new Client({
  webSocketFactory: () => new WebSocket(args.url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
  reconnectDelay: 0,
  heartbeatIncoming: 0,
  heartbeatOutgoing: 0,
  connectHeaders: args.connectHeaders || {},
});

let connected = null;
let connectError = null;
let lastError = null;
let closed = false;
const received = [];
const receipts = new Set();

client.onStompError = (frame) => { lastError = frame.headers.message; };
client.onWebSocketClose = () => { closed = true; };

async function run() {
  await new Promise((resolve) => {
    client.onConnect = (frame) => { connected = headersOf(frame); resolve(); };
    client.onStompError = (frame) => { lastError = frame.headers.message; if (!connected) resolve(); };
    client.onWebSocketClose = () => { closed = true; resolve(); };
    client.activate();
  });
  if (!connected) {
    connectError = lastError;
    await client.deactivate();
    return { connected, connectError, steps: [], received };
  }
  const steps = [];
  let n = 0;
  for (const step of args.steps || []) {
    const id = `r-${n++}`;
    if (step.op === 'wait') {
      await waitFor(() => received.some((p) => p.type === 'TALK' && p.message === step.text), step.text);
      steps.push({ op: 'wait', outcome: 'received' });
      continue;
    }
    client.watchForReceipt(id, () => receipts.add(id));
    if (step.op === 'subscribe') {
      client.subscribe(step.destination, (m) => received.push(JSON.parse(m.body)), { receipt: id });
    } else if (step.op === 'send') {
      const body = { type: 'TALK', roomId: step.room, message: step.message };
      if (step.sender) body.sender = step.sender;
      const headers = { receipt: id, 'content-type': 'application/json' };
      if (step.clientMsgId) headers['client-msg-id'] = step.clientMsgId;
      client.publish({ destination: '/pub/chat/message', headers, body: JSON.stringify(body) });
    } else {
      throw new Error(`unknown step ${step.op}`);
    }
    await waitFor(() => receipts.has(id) || lastError !== null || closed, `answer to ${step.op}`);
    if (receipts.has(id)) {
      steps.push({ op: step.op, outcome: 'receipt' });
    } else {
      steps.push({ op: step.op, outcome: 'error', message: lastError });
      break;
    }
  }
  await client.deactivate();
  return { connected, connectError, steps, received };
}

run().then(finish, fail);
