'use strict';
// The SDK against a real queen and drone (target/debug, or HIVE_QUEEN_BIN / HIVE_DRONE_BIN):
// the drone runs this SDK's hive-worker as its worker pools.
const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { Hive, until, alive, nodePool, unavailable, DEADLINE_MS } = require('../testkit/hive');
const { ApiError } = require('..');

const missing = unavailable();
// HIVE_REQUIRE_INTEGRATION=1 (CI) turns a missing or pool-less binary into a failure.
const skip = missing && process.env.HIVE_REQUIRE_INTEGRATION !== '1' ? missing : false;

describe('integration: a real queen and drone run hive-worker pools', { skip }, () => {
  /** @type {Hive} */
  let hive;
  /** @type {import('..').Client} */
  let c;
  const PIN = ['hive-test:a1'];

  before(async () => {
    if (missing) throw new Error(missing);
    hive = new Hive();
    await hive.startQueen();
    await hive.explain(() =>
      hive.startDrone('a1', {
        slots: 4,
        pools: [
          nodePool('node', ['tasks.js']),
          nodePool('other', ['exported.js', 'exported.mjs']),
          nodePool('example', [path.join(__dirname, '..', 'examples', 'tasks.js')]),
          nodePool('recycle', ['recycle.js'], { max_tasks: 2 }),
        ],
      }),
    );
    c = hive.client;
  });

  after(async () => {
    if (hive) await hive.stop();
  });

  /** A test whose failure message carries the processes' logs. */
  const test = (name, fn) => it(name, () => hive.explain(fn));

  /** Submits a task pinned to drone a1. */
  const submit = (kind, payload, spec = {}) => c.submit(kind, payload, { labels: PIN, ...spec });
  const finish = (task) => c.wait(task.id, { timeoutMs: DEADLINE_MS });
  const run = async (kind, payload, spec) => finish(await submit(kind, payload, spec));

  /** The pid of the `node` pool's (single) process, as a task sees it. */
  async function poolPid() {
    const t = await run('node.pid', null);
    assert.equal(t.state, 'succeeded', JSON.stringify(t));
    hive.workerPids.add(t.result);
    return t.result;
  }

  /** Waits for a node.park task's pid file and returns the pid in it. */
  async function parkedPid(dir, task, attempt = 1) {
    const file = path.join(dir, `${task.id}-${attempt}.pid`);
    const pid = Number(await until(`${file}`, () => fs.existsSync(file) && fs.readFileSync(file, 'utf8')));
    hive.workerPids.add(pid);
    return pid;
  }

  function parkDir(name) {
    const dir = path.join(hive.dir, name);
    fs.mkdirSync(dir, { recursive: true });
    return dir;
  }

  test('the drone announces the pools\' kinds', async () => {
    const [drone] = (await c.drones()).filter((d) => d.name === 'a1');
    for (const kind of ['node.echo', 'node.park', 'node.exported', 'node.other', 'node.esm']) {
      assert.ok(drone.kinds.includes(kind), `${kind} in ${drone.kinds}`);
    }
  });

  test('submit -> handler -> result, with the lease in ctx', async () => {
    const t = await run('node.echo', { hello: ['bee', 1, null] });
    assert.equal(t.state, 'succeeded');
    assert.deepEqual(t.result, { hello: ['bee', 1, null] });
    const ctx = await run('node.ctx', null, { queue: 'nodeq', timeout_ms: 60000 });
    assert.equal(ctx.state, 'succeeded');
    assert.deepEqual(ctx.result, {
      taskId: ctx.id,
      attempt: 1,
      fence: ctx.fence,
      kind: 'node.ctx',
      queue: 'nodeq',
      timeoutMs: 60000,
      lastCheckpoint: null,
    });
    const a = await run('node.async', 21);
    assert.deepEqual(a.result, { doubled: 42 });
  });

  test('wait() returns promptly after the task ends', async () => {
    const t = await submit('node.echo', 'later', { delay_ms: 400 });
    const started = Date.now();
    const done = await c.wait(t.id, { timeoutMs: DEADLINE_MS });
    const returned = Date.now();
    assert.equal(done.state, 'succeeded');
    assert.ok(returned - started >= 300, `returned after ${returned - started} ms, before the task could run`);
    const lag = returned - Date.parse(done.finished_at);
    assert.ok(lag < 1000, `wait() returned ${lag} ms after the task finished`);
  });

  test('a thrown error is retried, then the task fails with every error kept', async () => {
    const t = await run('node.boom', null, { max_attempts: 2 });
    assert.equal(t.state, 'failed');
    assert.equal(t.attempts, 2);
    assert.deepEqual(t.errors.map((e) => e.error), ['TypeError: kaboom', 'TypeError: kaboom']);
  });

  test('a PermanentError is not retried', async () => {
    const t = await run('node.perm', null, { max_attempts: 3 });
    assert.equal(t.state, 'failed');
    assert.equal(t.attempts, 1);
    assert.deepEqual(t.errors.map((e) => e.error), ['PermanentError: bad input']);
  });

  test('a result that is not JSON fails the task for good', async () => {
    const t = await run('node.bigint', null, { max_attempts: 3 });
    assert.equal(t.state, 'failed');
    assert.equal(t.attempts, 1);
    assert.match(t.errors[0].error, /the result is not JSON-serializable: TypeError: .*BigInt/);
  });

  test('a timeout kills a stuck handler, and the next task runs on a fresh process', async () => {
    const before = await poolPid();
    const t = await run('node.hang', null, { timeout_ms: 300, max_attempts: 1 });
    assert.equal(t.state, 'failed');
    assert.match(t.errors[0].error, /timed out after 300 ms/);
    const after = await poolPid();
    assert.notEqual(after, before);
    await until(`the timed-out process ${before} to be gone`, () => !alive(before));
  });

  test('cancel stops a running handler', async () => {
    const dir = parkDir('cancel');
    const t = await submit('node.park', { dir }, { max_attempts: 1 });
    const pid = await parkedPid(dir, t);
    const cancelled = await c.cancel(t.id, 'not needed');
    assert.equal(cancelled.state, 'cancelled');
    assert.equal(cancelled.cancel_reason, 'not needed');
    await until(`the cancelled task's process ${pid} to be gone`, () => !alive(pid));
    const next = await poolPid();
    assert.notEqual(next, pid);
  });

  test('a handler calling process.exit(3): the attempt fails with the exit code, the process is replaced', async () => {
    const before = await poolPid();
    const t = await run('node.exit', { code: 3 }, { max_attempts: 1 });
    assert.equal(t.state, 'failed');
    assert.match(t.errors[0].error, /exit(ed)? (with )?(code|status) 3\b/);
    assert.notEqual(await poolPid(), before);
  });

  test('a handler that segfaults: the attempt fails naming the signal, the process is replaced', async () => {
    const before = await poolPid();
    const t = await run('node.segv', null, { max_attempts: 1 });
    assert.equal(t.state, 'failed');
    assert.match(t.errors[0].error, /SIGSEGV|signal 11/);
    assert.notEqual(await poolPid(), before);
  });

  test('a checkpoint reaches the next attempt', async () => {
    const dir = parkDir('checkpoint');
    const t = await submit('node.park', { dir, checkpoint: { step: 'one', n: 1 }, park_attempts: 1 }, { max_attempts: 2 });
    const pid = await parkedPid(dir, t);
    // The queen has it (sent with a heartbeat) ...
    await until('the checkpoint on the task', async () => (await c.get(t.id)).checkpoint);
    assert.deepEqual((await c.get(t.id)).checkpoint, { step: 'one', n: 1 });
    // ... and the next attempt gets it.
    process.kill(pid, 'SIGKILL');
    const done = await finish(t);
    assert.equal(done.state, 'succeeded', JSON.stringify(done.errors));
    assert.equal(done.result.attempt, 2);
    assert.deepEqual(done.result.lastCheckpoint, { step: 'one', n: 1 });
    assert.match(done.errors[0].error, /SIGKILL|signal 9/);
  });

  test('a checkpoint sent just before a retryable failure reaches the retry', async () => {
    // No heartbeat in between: the drone sends the last checkpoint ahead of the outcome.
    const t = await run('node.checkpoint-then-fail', null, { max_attempts: 2 });
    assert.equal(t.state, 'succeeded', JSON.stringify(t.errors));
    assert.deepEqual(t.result, { attempt: 2, lastCheckpoint: { from: 1 } });
    assert.deepEqual(t.errors.map((e) => e.error), ['Error: failed after a checkpoint']);
  });

  test('max_tasks: the drone closes the channel, the worker exits, a fresh one takes over', async () => {
    const pids = [];
    for (let i = 0; i < 3; i++) {
      const t = await run('node.recycle-pid', null);
      assert.equal(t.state, 'succeeded');
      pids.push(t.result);
      hive.workerPids.add(t.result);
    }
    assert.equal(pids[0], pids[1]);
    assert.notEqual(pids[2], pids[0]);
    await until(`the retired process ${pids[0]} to exit`, () => !alive(pids[0]));
    assert.doesNotMatch(hive.drones.get('a1').output, /recycle.*(SIGKILL|killed)/);
  });

  test('two pools with different kinds on one drone', async () => {
    const [a, b, e] = await Promise.all([
      run('node.exported', 'x'),
      run('node.other', 'y'),
      run('node.esm', 'z'),
    ]);
    assert.deepEqual([a.result, b.result, e.result], [{ hello: 'x' }, 'other:y', { esm: 'z' }]);
  });

  test('the example tasks run', async () => {
    const greet = await run('node.greet', { name: 'bee' });
    assert.deepEqual(greet.result, { greeting: 'hello, bee' });
    const numbers = Array.from({ length: 2500 }, (_, i) => i);
    const sum = await run('node.sum', numbers);
    assert.deepEqual(sum.result, { sum: (2499 * 2500) / 2, count: 2500 });
  });

  test('client errors carry the status and the API message', async () => {
    await assert.rejects(c.submit('node.echo', null, { priorty: 1 }), (e) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.status, 400);
      assert.match(e.message, /unknown field `priorty`/);
      return true;
    });
    await assert.rejects(c.get('01900000-0000-7000-8000-000000000000'), { status: 404, message: /no task/ });
    await assert.rejects(c.get('not-a-uuid'), { status: 400 });
    const t = await run('node.echo', 1);
    await assert.rejects(c.cancel(t.id), { status: 409 });
    const stats = await c.stats();
    assert.ok(stats.by_state.succeeded >= 1);
    const page = await c.list({ state: 'succeeded', limit: 2 });
    assert.equal(page.tasks.length, 2);
    assert.ok(page.next);
    const ids = [];
    for await (const task of c.iterate({ state: 'succeeded', limit: 2 })) {
      ids.push(task.id);
      if (ids.length === 5) break;
    }
    assert.equal(new Set(ids).size, 5, 'pages follow each other');
    assert.deepEqual(ids.slice(0, 2), page.tasks.map((x) => x.id));
  });

  test('a retried submit with the same idempotency key does not create a second task', async () => {
    const first = await submit('node.echo', 'once', { idempotency_key: `node-sdk-${Date.now()}` });
    const again = await submit('node.echo', 'once', { idempotency_key: first.idempotency_key });
    assert.equal(again.id, first.id);
    const batch = await c.batch([
      { kind: 'node.echo', payload: 1, labels: PIN },
      { kind: 'node.echo', payload: 2, labels: PIN },
    ]);
    const done = await Promise.all(batch.map(finish));
    assert.deepEqual(done.map((t) => t.result), [1, 2]);
  });

  test('kill -9 of a drone kills its pool processes; its tasks finish on another drone', async () => {
    const dir = parkDir('kill');
    const pool = nodePool('node', ['tasks.js'], { processes: 2 });
    const k1 = await hive.startDrone('k1', { slots: 2, labels: ['hive-test:kill'], pools: [pool] });
    const spec = { labels: ['hive-test:kill'], max_attempts: 3 };
    const tasks = await Promise.all([1, 2].map(() => c.submit('node.park', { dir, park_attempts: 1 }, spec)));
    const pids = await Promise.all(tasks.map((t) => parkedPid(dir, t)));
    assert.notEqual(pids[0], pids[1]);
    await hive.startDrone('k2', { slots: 2, labels: ['hive-test:kill'], pools: [pool] });
    k1.kill9();
    await k1.exited;
    for (const pid of pids) await until(`pool process ${pid} of the killed drone to die`, () => !alive(pid));
    const done = await Promise.all(tasks.map(finish));
    for (const t of done) {
      assert.equal(t.state, 'succeeded', JSON.stringify(t.errors));
      assert.equal(t.result.attempt, 2);
      assert.ok(!pids.includes(t.result.pid));
      hive.workerPids.add(t.result.pid);
    }
  });

  /** Starts a drone whose pool cannot start; returns its output once it has exited. */
  async function failedDrone(name, pool) {
    const proc = hive.spawnDrone(name, { pools: [pool] });
    const { code } = await until(`drone ${name} to exit`, () => !proc.running && proc.exited);
    assert.notEqual(code, 0, `drone ${name} exited with ${code}`);
    await until(`drone ${name}'s output`, () => proc.child.stderr.readableEnded || proc.child.stderr.destroyed);
    return proc.output;
  }

  test('a pool command that does not exist stops the drone with a clear error', async () => {
    const out = await failedDrone('bad1', { name: 'ghost', command: ['/nonexistent/hive-worker', 'worker'] });
    assert.match(out, /pool `ghost`/);
    assert.match(out, /\/nonexistent\/hive-worker: No such file or directory/);
  });

  test('a tasks module that throws at load stops the drone with its error', async () => {
    const out = await failedDrone('bad2', nodePool('broken', ['throws.js']));
    assert.match(out, /pool `broken`.*exited with code 1 before it said `ready`/);
    assert.match(out, /loading task module .*throws\.js failed: Error: the tasks module is broken on purpose\n.*throws\.js:2/);
  });

  test('a tasks module without tasks stops the drone saying so', async () => {
    const out = await failedDrone('bad3', nodePool('empty', ['empty.js']));
    assert.match(out, /pool `empty`.*exited with code 1 before it said `ready`/);
    assert.match(out, /task module .*empty\.js defines no tasks/);
  });
});
