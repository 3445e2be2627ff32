// Shared plumbing for the Node client scripts (ES modules). Every script takes one JSON argument
// (process.argv[2]) and prints one JSON object as its last stdout line: {"ok": true, ...observations}
// or {"ok": false, "error": "..."}. Progress lines {"event": "..."} may come before it.
// No STOMP logic lives here: each script drives its real client library.

import WebSocket from 'ws';

export { WebSocket };

export const args = JSON.parse(process.argv[2] || '{}');

export function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

export function finish(obj) {
  emit({ ok: true, ...obj });
  process.exit(0);
}

export function fail(error) {
  emit({ ok: false, error: String(error && error.stack ? error.stack : error) });
  process.exit(1);
}

process.on('unhandledRejection', fail);
process.on('uncaughtException', fail);

// Overall deadline so a hung client never hangs the test run.
const deadline = setTimeout(() => fail(new Error(`script timeout after ${args.timeoutMs || 20000} ms`)),
  args.timeoutMs || 20000);
deadline.unref();

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export async function waitFor(predicate, what, timeoutMs = 10000) {
  const end = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

export function headersOf(frame) {
  return Object.fromEntries(Object.entries(frame.headers || {}));
}
