// A burst of MESSAGE frames reaching one subscriber, with the three JavaScript clients.
// Argument: {"url": "ws://.../ws-stomp/websocket", "client": "stompjs7" | "stompjs-legacy" | "webstomp",
//            "destination": "/sub/...", "count": N}
// Subscribes (with a receipt), prints {"event": "subscribed"}, then waits for `count` messages (the test
// publishes them in one go, so the server sends several frames per WebSocket message) and reports
// their bodies in arrival order.
import { createRequire } from 'node:module';
import { Client } from '@stomp/stompjs';
import Stomp from 'stompjs';
import { args, finish, waitFor, WebSocket, emit } from './lib.mjs';

const require = createRequire(import.meta.url);
const webstomp = require('webstomp-client');
const bodies = [];
const onMessage = (message) => bodies.push(message.body);

async function subscribeStompjs7() {
  const client = new Client({
    webSocketFactory: () => new WebSocket(args.url, ['v12.stomp']),
    reconnectDelay: 0, heartbeatIncoming: 0, heartbeatOutgoing: 0,
  });
  await new Promise((resolve, reject) => {
    client.onConnect = resolve;
    client.onStompError = (frame) => reject(new Error(frame.headers.message));
    client.activate();
  });
  await new Promise((resolve) => {
    client.watchForReceipt('sub', resolve);
    client.subscribe(args.destination, onMessage, { receipt: 'sub' });
  });
  return () => client.deactivate();
}

async function subscribeClassic(client) {
  client.debug = () => {};
  client.heartbeat.outgoing = 0;
  client.heartbeat.incoming = 0;
  await new Promise((resolve, reject) => client.connect({}, resolve, (err) => reject(new Error(String(err)))));
  client.subscribe(args.destination, onMessage);
  return () => client.disconnect();
}

const subscribe = {
  stompjs7: subscribeStompjs7,
  'stompjs-legacy': () => subscribeClassic(Stomp.over(new WebSocket(args.url, ['v11.stomp', 'v10.stomp']))),
  webstomp: () => subscribeClassic(webstomp.over(new WebSocket(args.url, ['v12.stomp']), { debug: false })),
}[args.client];

const stop = await subscribe();
emit({ event: 'subscribed' });
await waitFor(() => bodies.length >= args.count, `${args.count} messages`, 15000);
stop();
finish({ bodies });
