'use strict';
// The client against a local node:http stub of the queen's API.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const { execFileSync } = require('node:child_process');
const { Client, ApiError, ConnectionError, WaitTimeoutError, HiveError } = require('..');

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/**
 * A stub API: `handler(req, body, n)` answers each request (n counts from 1); every request
 * is recorded as {method, url, headers, body}.
 */
async function stub(t, handler, server = http.createServer()) {
  const seen = [];
  server.on('request', (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString();
      const rec = { method: req.method, url: req.url, headers: req.headers, body: text ? JSON.parse(text) : undefined };
      seen.push(rec);
      handler(req, res, rec, seen.length);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const { port } = server.address();
  return { seen, port, url: `${server instanceof https.Server ? 'https' : 'http'}://127.0.0.1:${port}` };
}

function json(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function client(t, options) {
  const c = new Client({ retryBaseMs: 1, ...options });
  t.after(() => c.close());
  return c;
}

test('submit sends the spec with a generated idempotency key and the bearer token', async (t) => {
  const s = await stub(t, (req, res, rec) => json(res, 201, { id: 'id-1', state: 'pending', ...rec.body }));
  const c = client(t, { baseUrl: s.url, token: 'sekrit' });
  const task = await c.submit('node.greet', { name: 'x' }, { queue: 'q', max_attempts: 2 });
  assert.equal(task.id, 'id-1');
  const [rec] = s.seen;
  assert.equal(rec.method, 'POST');
  assert.equal(rec.url, '/v1/tasks');
  assert.equal(rec.headers.authorization, 'Bearer sekrit');
  assert.match(rec.body.idempotency_key, UUID);
  assert.deepEqual({ ...rec.body, idempotency_key: 'k' }, {
    kind: 'node.greet',
    payload: { name: 'x' },
    queue: 'q',
    max_attempts: 2,
    idempotency_key: 'k',
  });
  // A key given is kept.
  await c.submit('node.greet', null, { idempotency_key: 'mine' });
  assert.equal(s.seen[1].body.idempotency_key, 'mine');
  assert.equal(s.seen[1].body.payload, null);
});

test('a submit retried after a dropped connection carries the same idempotency key', async (t) => {
  const s = await stub(t, (req, res, rec, n) => {
    if (n <= 2) req.socket.destroy(); // the queen went away mid-request, twice
    else json(res, 201, { id: 'id-1', state: 'pending' });
  });
  const c = client(t, { baseUrl: s.url, retries: 3 });
  const task = await c.submit('node.greet', 1);
  assert.equal(task.id, 'id-1');
  assert.equal(s.seen.length, 3);
  const keys = new Set(s.seen.map((r) => r.body.idempotency_key));
  assert.equal(keys.size, 1, `one key for every try: ${[...keys]}`);
  assert.match([...keys][0], UUID);
});

test('batch gives every spec a key, kept across a retry', async (t) => {
  const s = await stub(t, (req, res, rec, n) => {
    if (n === 1) req.socket.destroy();
    else json(res, 201, { tasks: rec.body.tasks.map((x, i) => ({ id: `id-${i}`, ...x })) });
  });
  const c = client(t, { baseUrl: s.url });
  const tasks = await c.batch([{ kind: 'a' }, { kind: 'b', idempotency_key: 'given' }]);
  assert.deepEqual(tasks.map((x) => x.id), ['id-0', 'id-1']);
  assert.equal(s.seen.length, 2);
  assert.deepEqual(s.seen[0].body, s.seen[1].body);
  assert.match(s.seen[0].body.tasks[0].idempotency_key, UUID);
  assert.equal(s.seen[0].body.tasks[1].idempotency_key, 'given');
});

test('API errors carry the status and the error message', async (t) => {
  const s = await stub(t, (req, res, rec) => {
    if (rec.url.startsWith('/v1/tasks/nope')) json(res, 404, { error: 'no task nope' });
    else if (rec.url === '/v1/tasks') json(res, 400, { error: 'invalid task spec: unknown field `priorty`' });
    else {
      res.writeHead(502);
      res.end('bad gateway');
    }
  });
  const c = client(t, { baseUrl: s.url });
  await assert.rejects(c.submit('x', null, { priorty: 1 }), (e) => {
    assert.ok(e instanceof ApiError && e instanceof HiveError);
    assert.equal(e.status, 400);
    assert.equal(e.message, 'invalid task spec: unknown field `priorty`');
    assert.equal(e.method, 'POST');
    return true;
  });
  await assert.rejects(c.get('nope'), { name: 'ApiError', status: 404, message: 'no task nope' });
  await assert.rejects(c.stats(), { name: 'ApiError', status: 502, message: 'bad gateway' });
  assert.equal(s.seen.length, 3, 'API errors are not retried');
});

test('nothing listening -> ConnectionError after the retries', async (t) => {
  const server = http.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  server.close();
  await once(server, 'close');
  const c = client(t, { baseUrl: `http://127.0.0.1:${port}`, retries: 2 });
  await assert.rejects(c.get('x'), (e) => {
    assert.ok(e instanceof ConnectionError);
    assert.equal(e.code, 'ECONNREFUSED');
    assert.equal(e.attempts, 3);
    assert.match(e.message, /GET \/v1\/tasks\/x: .*ECONNREFUSED.*after 3 tries/);
    return true;
  });
});

test('no answer within timeoutMs -> retried, then ConnectionError ETIMEDOUT', async (t) => {
  const s = await stub(t, () => {}); // never answers
  const c = client(t, { baseUrl: s.url, timeoutMs: 150, retries: 1 });
  await assert.rejects(c.drones(), { name: 'ConnectionError', code: 'ETIMEDOUT', attempts: 2 });
  assert.equal(s.seen.length, 2);
});

test('a cancel that may have reached the queen is not sent twice', async (t) => {
  const s = await stub(t, (req) => req.socket.destroy());
  const c = client(t, { baseUrl: s.url, retries: 3 });
  await assert.rejects(c.cancel('t1', 'why'), { name: 'ConnectionError', code: 'ECONNRESET', attempts: 1 });
  assert.equal(s.seen.length, 1);
  assert.deepEqual(s.seen[0].body, { reason: 'why' });
});

test('cancel, retry, list, drones, stats: paths, query strings and bodies', async (t) => {
  const s = await stub(t, (req, res, rec) => {
    if (rec.url === '/v1/drones') json(res, 200, { drones: [{ id: 'd' }] });
    else if (rec.url.startsWith('/v1/tasks?')) json(res, 200, { tasks: [] });
    else json(res, 200, { ok: true });
  });
  const c = client(t, { baseUrl: `${s.url}/` });
  await c.cancel('t1');
  await c.retry('t1');
  await c.list({ state: 'failed', queue: 'q', limit: 5, before: undefined });
  assert.deepEqual(await c.drones(), [{ id: 'd' }]);
  await c.stats();
  assert.deepEqual(
    s.seen.map((r) => `${r.method} ${r.url} ${r.body === undefined ? '-' : JSON.stringify(r.body)}`),
    [
      'POST /v1/tasks/t1/cancel -',
      'POST /v1/tasks/t1/retry -',
      'GET /v1/tasks?state=failed&queue=q&limit=5 -',
      'GET /v1/drones -',
      'GET /v1/stats -',
    ],
  );
  assert.equal(s.seen[0].headers['content-length'], '0');
});

test('wait() long-polls until the task ends', async (t) => {
  const s = await stub(t, (req, res, rec, n) => json(res, 200, { id: 't', state: n < 3 ? 'running' : 'succeeded', result: 7 }));
  const c = client(t, { baseUrl: s.url });
  const task = await c.wait('t');
  assert.equal(task.state, 'succeeded');
  assert.deepEqual(s.seen.map((r) => r.url), Array(3).fill('/v1/tasks/t?wait_ms=60000'));
});

test('wait() with a timeout asks for no more than the time left, then throws WaitTimeoutError', async (t) => {
  // The stub holds each request for its wait_ms, as the queen does.
  const s = await stub(t, (req, res, rec) => {
    const ms = Number(new URL(rec.url, 'http://x').searchParams.get('wait_ms'));
    setTimeout(() => json(res, 200, { id: 't', state: 'running' }), ms);
  });
  const c = client(t, { baseUrl: s.url });
  const started = Date.now();
  await assert.rejects(c.wait('t', { timeoutMs: 300 }), (e) => {
    assert.ok(e instanceof WaitTimeoutError);
    assert.equal(e.taskId, 't');
    assert.equal(e.task.state, 'running');
    return true;
  });
  assert.ok(Date.now() - started >= 300);
  const waits = s.seen.map((r) => Number(new URL(r.url, 'http://x').searchParams.get('wait_ms')));
  assert.ok(waits[0] <= 300 && waits[0] >= 250, `${waits}`);
  assert.ok(waits.every((w) => w <= 300));
});

test('https with a CA', async (t) => {
  let pem;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hive-node-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  try {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
      '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'),
    ], { stdio: 'ignore' });
    pem = { key: fs.readFileSync(path.join(dir, 'key.pem')), cert: fs.readFileSync(path.join(dir, 'cert.pem')) };
  } catch {
    t.skip('openssl is not available to make a certificate');
    return;
  }
  const s = await stub(t, (req, res) => json(res, 200, { by_state: {} }), https.createServer(pem));
  const c = client(t, { baseUrl: s.url, ca: pem.cert });
  assert.deepEqual(await c.stats(), { by_state: {} });
  // Without the CA the certificate is refused, and that is not retried.
  const bare = client(t, { baseUrl: s.url, retries: 3 });
  await assert.rejects(bare.stats(), (e) => e instanceof ConnectionError && e.attempts === 1);
});
