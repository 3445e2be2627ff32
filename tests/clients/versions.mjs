// Reports the installed versions of the pinned client packages (as Node resolves them from
// tests/clients/, i.e. the repository's node_modules) and of Node itself.
import { createRequire } from 'node:module';
import { readFileSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { finish } from './lib.mjs';

const require = createRequire(import.meta.url);

function versionOf(name) {
  let dir = dirname(require.resolve(name));
  for (;;) {
    const file = join(dir, 'package.json');
    if (existsSync(file)) {
      const pkg = JSON.parse(readFileSync(file, 'utf8'));
      if (pkg.name === name) return pkg.version;
    }
    const up = dirname(dir);
    if (up === dir) throw new Error(`package.json of ${name} not found`);
    dir = up;
  }
}

const names = ['@stomp/stompjs', 'webstomp-client', 'stompjs', 'ws'];
finish({ versions: Object.fromEntries(names.map((n) => [n, versionOf(n)])), node: process.version });
