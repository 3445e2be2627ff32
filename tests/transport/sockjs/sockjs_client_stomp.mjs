// Drive a SockJS endpoint with the real JavaScript clients in Node 20: sockjs-client 1.6.1 forced to one
// transport, carrying STOMP from stompjs 2.3.3 (Stomp.over, what the Spring chat pages use) or
// @stomp/stompjs 7 (Client with webSocketFactory).
//
// The script connects, subscribes to --subscribe, sends --count messages to --send-to (body: --body with
// every "{i}" replaced by the message index), waits until --expect messages arrived on the
// subscription, disconnects and exits 0. Every event is one JSON line on stdout:
//   {"event":"connected","transport":"xhr-streaming","version":"1.2","headers":{...}}
//   {"event":"message","destination":"...","body":"...","headers":{...}}
//   {"event":"done","received":N}
// and failures {"event":"error",...} with exit status 1 (also on --timeout-ms).
//
// Usage: node sockjs_client_stomp.mjs --url http://127.0.0.1:8080/ws-stomp --transport xhr-polling
//          [--client stompjs|stomp7] [--subscribe /sub/chat/room/1] [--send-to /pub/chat/message]
//          [--body '{"type":"TALK","roomId":"1","sender":"n","message":"m{i}"}'] [--count 3]
//          [--expect 3] [--login u --passcode p] [--header name:value ...] [--timeout-ms 15000] [--debug]
// Transports: websocket, xhr-streaming, xhr-polling, eventsource (iframe-based ones need a browser).

import { createRequire } from "node:module";
import { parseArgs } from "node:util";

const require = createRequire(import.meta.url);
const SockJS = require("sockjs-client");

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    transport: { type: "string", default: "websocket" },
    client: { type: "string", default: "stompjs" },
    subscribe: { type: "string", default: "/sub/chat/room/1" },
    "send-to": { type: "string", default: "/pub/chat/message" },
    body: { type: "string", default: '{"type":"TALK","roomId":"1","sender":"node","message":"m{i}"}' },
    count: { type: "string", default: "3" },
    expect: { type: "string" },
    login: { type: "string" },
    passcode: { type: "string" },
    header: { type: "string", multiple: true, default: [] },
    "timeout-ms": { type: "string", default: "15000" },
    debug: { type: "boolean", default: false },
  },
});

if (!opts.url) {
  console.error("--url is required");
  process.exit(2);
}
const count = Number(opts.count);
const expected = opts.expect === undefined ? count : Number(opts.expect);
const connectHeaders = {};
if (opts.login !== undefined) connectHeaders.login = opts.login;
if (opts.passcode !== undefined) connectHeaders.passcode = opts.passcode;
for (const pair of opts.header) {
  const at = pair.indexOf(":");
  connectHeaders[pair.slice(0, at)] = pair.slice(at + 1);
}

const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const debug = (text) => { if (opts.debug) process.stderr.write(String(text) + "\n"); };
let finished = false;
const fail = (reason, extra = {}) => {
  if (finished) return;
  finished = true;
  emit({ event: "error", reason, ...extra });
  process.exit(1);
};
const timer = setTimeout(() => fail("timeout"), Number(opts["timeout-ms"]));

function newSocket() {
  const sock = new SockJS(opts.url, null, { transports: [opts.transport] });
  sock.addEventListener("close", (e) => {
    debug(`sockjs close ${e.code} ${e.reason}`);
    if (!finished) fail("sockjs closed", { code: e.code, reason: e.reason });
  });
  return sock;
}

const bodyOf = (i) => opts.body.replaceAll("{i}", String(i));
let received = 0;

function onMessage(destination, body, headers) {
  received += 1;
  emit({ event: "message", destination, body, headers });
  return received >= expected;
}

function runStompJs() {
  const Stomp = require("stompjs");
  const sock = newSocket();
  const client = Stomp.over(sock);
  client.debug = opts.debug ? debug : null;
  client.connect(connectHeaders, (frame) => {
    emit({ event: "connected", transport: sock.transport, version: frame.headers.version,
           headers: frame.headers });
    client.subscribe(opts.subscribe, (message) => {
      if (onMessage(message.headers.destination, message.body, message.headers)) {
        finished = true;
        clearTimeout(timer);
        client.disconnect(() => {
          emit({ event: "done", received });
          process.exit(0);
        });
      }
    });
    for (let i = 0; i < count; i++) {
      client.send(opts["send-to"], { "content-type": "application/json" }, bodyOf(i));
    }
    if (expected === 0) {
      finished = true;
      client.disconnect(() => { emit({ event: "done", received }); process.exit(0); });
    }
  }, (error) => {
    fail("stomp error", { frame: typeof error === "string" ? error : { headers: error.headers, body: error.body } });
  });
}

async function runStomp7() {
  const { Client } = await import("@stomp/stompjs");
  let sock;
  const client = new Client({
    webSocketFactory: () => (sock = newSocket()),
    connectHeaders,
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    debug: opts.debug ? debug : () => {},
  });
  const finish = async () => {
    finished = true;
    clearTimeout(timer);
    await client.deactivate();
    emit({ event: "done", received });
    process.exit(0);
  };
  client.onConnect = (frame) => {
    emit({ event: "connected", transport: sock.transport, version: frame.headers.version,
           headers: frame.headers });
    client.subscribe(opts.subscribe, (message) => {
      if (onMessage(message.headers.destination, message.body, message.headers)) finish();
    });
    for (let i = 0; i < count; i++) {
      client.publish({ destination: opts["send-to"], body: bodyOf(i),
                       headers: { "content-type": "application/json" } });
    }
    if (expected === 0) finish();
  };
  client.onStompError = (frame) => fail("stomp error", { frame: { headers: frame.headers, body: frame.body } });
  client.activate();
}

if (opts.client === "stompjs") {
  runStompJs();
} else if (opts.client === "stomp7") {
  runStomp7().catch((e) => fail("exception", { message: String(e && e.stack || e) }));
} else {
  console.error(`unknown --client ${opts.client} (stompjs or stomp7)`);
  process.exit(2);
}
