'use strict';
// forkvm's in-sandbox agent for Node.js templates (the Python one is agent.py; both speak
// the same protocol).
//
// A template runs this file once: it loads the template's modules (argv[2:]) and the
// TypeScript compiler, lets the event loop empty, and reads its first request from the
// control channel (descriptor 3) inside `beforeExit`. That read parks the sandbox, and the
// VMM snapshots it there. Every fork resumes inside that read, with a request.
//
// A request's code runs as a program does under `node`: the reply is sent when the event
// loop has nothing left to do (the next `beforeExit`), with the exit code the program would
// have had (`process.exitCode`, 1 after an uncaught exception or unhandled rejection).
// Between requests the agent blocks in that read, so nothing of the code runs then.
//
// Code is evaluated as the REPL evaluates input: as a script in the one global context,
// top-level `await` allowed (Node's own REPL transform), `require` from the working
// directory, and `import` declarations and `import()` turned into our own dynamic import,
// which resolves from the working directory. In a session
// top-level `let`, `const` and `class` become `var`s, so what one request declares the next
// one sees, and may declare again.
//
// Frames on the control channel are a 4-byte little-endian length followed by a
// MessagePack map, in both directions.

const fs = require('fs');
const path = require('path');
const util = require('util');
const vm = require('vm');
const childProcess = require('child_process');
const { createRequire, isBuiltin } = require('module');
const { pathToFileURL } = require('url');
const { processTopLevelAwait } = require('internal/repl/await');
const acorn = require('internal/deps/acorn/acorn/dist/acorn');
const walk = require('internal/deps/acorn/acorn-walk/dist/walk');

const CONTROL_FD = 3;
const PROTOCOL_VERSION = 1;
// Largest request accepted (the VMM enforces its own, smaller, limit first).
const MAX_FRAME = 1 << 30;
const SHELLS = { bash: '/bin/bash', sh: '/bin/sh' };
// Where the code claims to come from in stack traces, as for `node -e`.
const EVAL_NAME = '[eval]';

// ---- MessagePack: the subset the protocol uses (maps, strings, binary, integers,
// booleans, nil; floats and arrays decoded for completeness).

function decode(buf) {
  let at = 0;
  const need = (n) => {
    if (at + n > buf.length) throw new Error('truncated MessagePack value');
  };
  const u8 = () => { need(1); return buf[at++]; };
  const take = (n) => { need(n); const out = buf.subarray(at, at + n); at += n; return out; };
  const uint = (n) => {
    need(n);
    let v = 0;
    for (let i = 0; i < n; i++) v = v * 256 + buf[at++];
    return v;
  };
  const str = (n) => take(n).toString('utf8');
  const arr = (n) => { const out = []; for (let i = 0; i < n; i++) out.push(value()); return out; };
  const map = (n) => {
    const out = {};
    for (let i = 0; i < n; i++) { const k = value(); out[k] = value(); }
    return out;
  };
  function value() {
    const b = u8();
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if ((b & 0xf0) === 0x80) return map(b & 0x0f);
    if ((b & 0xf0) === 0x90) return arr(b & 0x0f);
    if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return Buffer.from(take(uint(1)));
      case 0xc5: return Buffer.from(take(uint(2)));
      case 0xc6: return Buffer.from(take(uint(4)));
      case 0xca: { need(4); const v = buf.readFloatBE(at); at += 4; return v; }
      case 0xcb: { need(8); const v = buf.readDoubleBE(at); at += 8; return v; }
      case 0xcc: return uint(1);
      case 0xcd: return uint(2);
      case 0xce: return uint(4);
      case 0xcf: return uint(8);
      case 0xd0: { need(1); return buf.readInt8(at++); }
      case 0xd1: { need(2); const v = buf.readInt16BE(at); at += 2; return v; }
      case 0xd2: { need(4); const v = buf.readInt32BE(at); at += 4; return v; }
      case 0xd3: { need(8); const v = Number(buf.readBigInt64BE(at)); at += 8; return v; }
      case 0xd9: return str(uint(1));
      case 0xda: return str(uint(2));
      case 0xdb: return str(uint(4));
      case 0xdc: return arr(uint(2));
      case 0xdd: return arr(uint(4));
      case 0xde: return map(uint(2));
      case 0xdf: return map(uint(4));
      default: throw new Error(`unsupported MessagePack type 0x${b.toString(16)}`);
    }
  }
  return value();
}

function encode(message) {
  const parts = [];
  const head = (small, tag8, tag16, tag32, n) => {
    if (small !== null && n < 16) parts.push(Buffer.from([small | n]));
    else if (tag8 !== null && n < 0x100) parts.push(Buffer.from([tag8, n]));
    else if (n < 0x10000) { const b = Buffer.alloc(3); b[0] = tag16; b.writeUInt16BE(n, 1); parts.push(b); }
    else { const b = Buffer.alloc(5); b[0] = tag32; b.writeUInt32BE(n, 1); parts.push(b); }
  };
  function value(v) {
    if (v === null || v === undefined) parts.push(Buffer.from([0xc0]));
    else if (v === true) parts.push(Buffer.from([0xc3]));
    else if (v === false) parts.push(Buffer.from([0xc2]));
    else if (typeof v === 'number' && Number.isInteger(v) && v >= -(2 ** 31) && v < 2 ** 31) {
      const b = Buffer.alloc(5); b[0] = 0xd2; b.writeInt32BE(v, 1); parts.push(b);
    } else if (typeof v === 'string') {
      const bytes = Buffer.from(v, 'utf8');
      if (bytes.length < 32) parts.push(Buffer.from([0xa0 | bytes.length]));
      else head(null, 0xd9, 0xda, 0xdb, bytes.length);
      parts.push(bytes);
    } else if (typeof v === 'object') {
      const keys = Object.keys(v);
      head(0x80, null, 0xde, 0xdf, keys.length);
      for (const k of keys) { value(k); value(v[k]); }
    } else {
      throw new Error(`cannot encode ${typeof v}`);
    }
  }
  value(message);
  return Buffer.concat(parts);
}

// ---- The control channel.

let pending = Buffer.alloc(0);
// One buffer for every read of the channel, allocated before the snapshot: a fresh 1 MiB
// allocation per read would be new pages for every fork to fault in.
const readBuffer = Buffer.allocUnsafe(1 << 20);

function readExact(n) {
  while (pending.length < n) {
    const want = n - pending.length;
    const chunk = want > readBuffer.length ? Buffer.allocUnsafe(want) : readBuffer;
    let got;
    try {
      got = fs.readSync(CONTROL_FD, chunk, 0, chunk.length, null);
    } catch (error) {
      if (error.code === 'EINTR' || error.code === 'EAGAIN') continue;
      throw error;
    }
    if (got === 0) process.reallyExit(0); // the VMM is done with us
    pending = Buffer.concat([pending, chunk.subarray(0, got)]);
  }
  const out = pending.subarray(0, n);
  pending = pending.subarray(n);
  return out;
}

function readFrame() {
  const length = readExact(4).readUInt32LE(0);
  if (length > MAX_FRAME) throw new Error(`request frame of ${length} bytes is too large`);
  return decode(Buffer.from(readExact(length)));
}

function writeFrame(message) {
  const body = encode(message);
  const frame = Buffer.alloc(4 + body.length);
  frame.writeUInt32LE(body.length, 0);
  body.copy(frame, 4);
  for (let at = 0; at < frame.length;) at += fs.writeSync(CONTROL_FD, frame, at);
}

// ---- Fresh random state for each fork.

// `Math.random`'s state lives in the snapshot, so every fork would draw the same numbers:
// it is replaced by xoshiro128** over 32-bit words, reseeded by every fresh fork.
const randomState = new Uint32Array(4);
let urandom = -1;

function nextRandomWord() {
  const s = randomState;
  const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
  const t = s[1] << 9;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 11);
  return result;
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

function installMathRandom() {
  Object.defineProperty(Math, 'random', {
    value: function random() {
      // 53 random bits, as V8's own generator gives.
      return ((nextRandomWord() >>> 5) * 67108864 + (nextRandomWord() >>> 6)) / 9007199254740992;
    },
    writable: true,
    configurable: true,
  });
}

function reseed() {
  // From the system, not OpenSSL: its generator's state is in the snapshot too.
  // Opened before the snapshot: one read (one exit to the VMM) per fork.
  const seed = new Uint32Array(4);
  fs.readSync(urandom, seed);
  if (seed.every((word) => word === 0)) seed[0] = 1; // xoshiro's one forbidden state
  randomState.set(seed);
}

// ---- Running code.

// The request being served: { session, exitCode }; null while parked.
let current = null;

function stripAgentFrames(text) {
  return text
    .split('\n')
    .filter((line) => !line.includes(__filename))
    .join('\n');
}

// Prints an uncaught error as `node` does before it exits.
function reportUncaught(error) {
  let text;
  if (error instanceof Error) {
    text = util.inspect(error);
  } else {
    text = `Uncaught ${util.inspect(error)}`;
  }
  process.stderr.write(`${stripAgentFrames(text)}\n\nNode.js ${process.version}\n`);
}

function onUncaught(error) {
  reportUncaught(error);
  if (current && !current.session) {
    // As under `node`: the program ends here, its pending work with it.
    process.exit(1);
  }
  if (current) current.exitCode = 1;
}

// `import x from 'm'` resolved the way `require` would from the working directory
// (relative paths, the directory's node_modules), falling back to Node's own resolution
// for packages that only export ES modules.
function importFrom(directory) {
  const requireHere = createRequire(path.join(directory, EVAL_NAME));
  return (specifier) => {
    let target = specifier;
    if (isBuiltin(specifier)) {
      target = specifier.startsWith('node:') ? specifier : `node:${specifier}`;
    } else if (!specifier.includes(':')) {
      try {
        target = pathToFileURL(requireHere.resolve(specifier)).href;
      } catch (_) {
        if (specifier.startsWith('.') || specifier.startsWith('/')) {
          target = pathToFileURL(path.resolve(directory, specifier)).href;
        }
      }
    }
    return import(target);
  };
}

function importedName(node) {
  return node.type === 'Literal' ? JSON.stringify(node.value) : node.name;
}

// Rewrites what a script cannot hold (import declarations) and, in a session, makes
// top-level declarations persistent. Code that does not parse is left alone (`parsed`
// false): V8 then reports the syntax error as `node` would.
function rewrite(code, session) {
  let ast;
  try {
    ast = acorn.parse(code, {
      ecmaVersion: 'latest',
      sourceType: 'module',
      allowAwaitOutsideFunction: true,
      allowHashBang: true,
    });
  } catch (_) {
    return { code, parsed: false };
  }
  const edits = [];
  // `import(x)` anywhere: resolved from the working directory like the declarations.
  walk.full(ast, (node) => {
    if (node.type === 'ImportExpression') edits.push([node.start, node.start + 6, '__forkvmImport']);
  });
  for (const node of ast.body) {
    if (node.type === 'ImportDeclaration') {
      const source = `await __forkvmImport(${JSON.stringify(node.source.value)})`;
      const named = [];
      let namespace = null;
      for (const spec of node.specifiers) {
        if (spec.type === 'ImportDefaultSpecifier') named.push(`default: ${spec.local.name}`);
        else if (spec.type === 'ImportNamespaceSpecifier') namespace = spec.local.name;
        else named.push(`${importedName(spec.imported)}: ${spec.local.name}`);
      }
      let text;
      if (namespace) {
        text = `var ${namespace} = ${source};`;
        if (named.length) text += ` var { ${named.join(', ')} } = ${namespace};`;
      } else if (named.length) {
        text = `var { ${named.join(', ')} } = ${source};`;
      } else {
        text = `${source};`;
      }
      edits.push([node.start, node.end, text]);
    } else if (session && node.type === 'VariableDeclaration' && node.kind !== 'var') {
      edits.push([node.start, node.start + node.kind.length, 'var']);
    } else if (session && node.type === 'ClassDeclaration') {
      edits.push([node.start, node.start, `var ${node.id.name} = `]);
      edits.push([node.end, node.end, ';']);
    }
  }
  // Applied from the end, so earlier offsets stay valid (edits never overlap).
  edits.sort((a, b) => b[0] - a[0]);
  let out = code;
  for (const [start, end, text] of edits) {
    out = out.slice(0, start) + text + out.slice(end);
  }
  return { code: out, parsed: true };
}

let typescript = null;

// Strips TypeScript's types; returns null after printing syntax errors.
function transpile(code) {
  const ts = typescript;
  const result = ts.transpileModule(code, {
    fileName: `${EVAL_NAME}.ts`,
    reportDiagnostics: true,
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      importsNotUsedAsValues: ts.ImportsNotUsedAsValues.Remove,
      sourceMap: false,
    },
  });
  if (result.diagnostics && result.diagnostics.length) {
    const text = ts.formatDiagnostics(result.diagnostics, {
      getCanonicalFileName: (name) => name,
      getCurrentDirectory: () => process.cwd(),
      getNewLine: () => '\n',
    });
    process.stderr.write(text);
    return null;
  }
  return result.outputText;
}

function runScript(code, request) {
  const session = Boolean(request.keep_namespace);
  let source = code;
  if ((request.language || '') === 'typescript') {
    source = transpile(source);
    if (source === null) {
      current.exitCode = 1;
      current.exception = 'SyntaxError';
      return;
    }
  }
  // Code without `import` or `await` needs neither rewrite outside a session: it runs as
  // written (parsing it twice more would cost a fresh fork milliseconds).
  let wrapped = null;
  if (session || /\b(import|await)\b/.test(source)) {
    const rewritten = rewrite(source, session);
    source = rewritten.code;
    wrapped = rewritten.parsed ? processTopLevelAwait(source) : null;
  }
  const cwd = process.cwd();
  const importHere = importFrom(cwd);
  globalThis.__forkvmImport = importHere;
  globalThis.require = createRequire(path.join(cwd, EVAL_NAME));
  globalThis.__filename = EVAL_NAME;
  globalThis.__dirname = '.';
  let result;
  try {
    result = vm.runInThisContext(wrapped === null ? source : wrapped, { filename: EVAL_NAME });
  } catch (error) {
    if (error instanceof SyntaxError) current.exception = 'SyntaxError';
    onUncaught(error);
    return;
  }
  if (wrapped !== null) {
    // The transformed code's value: a promise settled when its last `await` is done.
    Promise.resolve(result).catch(onUncaught);
  }
}

function runShell(code, shell) {
  const child = childProcess.spawnSync(SHELLS[shell], ['-c', code], {
    argv0: shell,
    stdio: 'inherit',
    env: process.env,
  });
  if (child.error) {
    process.stderr.write(`forkvm: cannot start ${shell}: ${child.error.message}\n`);
    return 127;
  }
  if (child.signal) return 128 + require('os').constants.signals[child.signal];
  return child.status;
}

function start(request) {
  if (request.v !== PROTOCOL_VERSION) {
    throw new Error(`protocol version ${request.v} is not ${PROTOCOL_VERSION}`);
  }
  current = { session: Boolean(request.keep_namespace), exitCode: 0, exception: null };
  // Only a new fork reseeds: in a session, state the code set holds for its next request.
  if (request.fresh_fork !== false) reseed();
  Object.assign(process.env, request.env || {});
  if (request.cwd) {
    fs.mkdirSync(request.cwd, { recursive: true });
    process.chdir(request.cwd);
  }
  process.exitCode = undefined;
  process.argv.length = 1;
  const code = Buffer.isBuffer(request.code) ? request.code.toString('utf8') : String(request.code || '');
  const language = request.language || 'javascript';
  if (language in SHELLS) {
    current.exitCode = runShell(code, language);
  } else {
    runScript(code, request);
  }
}

// The event loop ran out of work: the request is done (or, the first time, the template
// is ready). Reply, then block for the next request.
function onLoopEmpty() {
  if (current) {
    const exitCode = current.exitCode || (process.exitCode | 0);
    writeFrame({ v: PROTOCOL_VERSION, exit_code: exitCode & 0xff, exception: current.exception });
    current = null;
  } else {
    collectGarbage();
  }
  start(readFrame());
  // Node exits when the loop is still empty after `beforeExit`: one turn of the loop
  // keeps it alive, so that code with nothing asynchronous is answered like the rest.
  setImmediate(() => {});
}

// Runs the request path once before the snapshot. V8 compiles functions on first call, and
// the TypeScript compiler is large: compiled here, every fork starts with it compiled.
function warmUp() {
  const ts = transpile('const n: number = await Promise.resolve(1);\n');
  const { code } = rewrite(`import fs from 'fs';\nlet x = 1;\nclass A {}\n${ts}`, true);
  processTopLevelAwait(code);
  vm.runInThisContext('JSON.stringify({ a: [1, 2.5] })', { filename: EVAL_NAME });
  util.inspect(new Error('warm-up'));
}

// A full, compacting collection just before the snapshot: otherwise the heap may be due
// one, and every fork would do it again on its first request (with V8's helper threads,
// and the request waits for them).
function collectGarbage() {
  require('v8').setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc');
  gc();
  gc();
}

// A template's own warm-up code (a spec's `warmup`), run once before the snapshot; the
// snapshot waits for what it starts asynchronously. It runs in an async function of its
// own, so its declarations do not collide with the requests' (what it loads stays in the
// module cache; what it means to keep it puts on `globalThis`). An error fails the build.
const WARMUP = '/opt/forkvm/warmup.js';

function runWarmupFile() {
  const { code } = rewrite(fs.readFileSync(WARMUP, 'utf8'), false);
  globalThis.__forkvmImport = importFrom(process.cwd());
  globalThis.require = createRequire(path.join(process.cwd(), EVAL_NAME));
  const body = vm.runInThisContext(`(async function () {\n${code}\n})`, { filename: WARMUP });
  body().catch((error) => {
    reportUncaught(error);
    process.exit(1);
  });
}

function main() {
  const modules = process.argv.slice(2);
  typescript = require('typescript');
  for (const name of modules) require(name);
  if (fs.existsSync(WARMUP)) runWarmupFile();
  urandom = fs.openSync('/dev/urandom', 'r');
  installMathRandom();
  warmUp();
  process.on('uncaughtException', onUncaught);
  process.on('beforeExit', onLoopEmpty);
}

main();
