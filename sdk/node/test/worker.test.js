'use strict';
// The worker against a fake drone: a real `hive-worker` process with a Unix socket as fd 3.
const test = require('node:test');
const assert = require('node:assert/strict');
const { FakeDrone } = require('../testkit/fake-drone');

/** Starts a worker on `modules`, checks its `ready`, and kills it after the test. */
async function worker(t, modules = ['tasks.js'], options) {
  const d = await FakeDrone.start(modules, options);
  t.after(() => d.kill());
  const ready = await d.next();
  assert.equal(ready.type, 'ready', JSON.stringify(ready));
  d.ready = ready;
  return d;
}

test('ready carries protocol 1, the kinds, the sdk and the pid', async (t) => {
  const d = await worker(t);
  assert.equal(d.ready.protocol, 1);
  assert.ok(d.ready.kinds.includes('node.echo'));
  assert.ok(d.ready.kinds.includes('node.park'));
  assert.match(d.ready.sdk, /^hive-node\/\d+\.\d+\.\d+/);
  assert.equal(d.ready.pid, d.child.pid);
});

test('run -> done with the result; undefined becomes null', async (t) => {
  const d = await worker(t);
  const [done] = await d.run('node.echo', { a: [1, 'two', null] }, { task_id: 't-1' });
  assert.deepEqual(done, { type: 'done', task_id: 't-1', result: { a: [1, 'two', null] } });
  const [undef] = await d.run('node.undefined', null);
  assert.equal(undef.type, 'done');
  assert.equal(undef.result, null);
});

test('the handler gets the lease in ctx', async (t) => {
  const d = await worker(t);
  const [done] = await d.run('node.ctx', null, {
    task_id: 't-ctx',
    attempt: 2,
    fence: 17,
    queue: 'q1',
    timeout_ms: 30000,
    checkpoint: { step: 3 },
  });
  assert.deepEqual(done.result, {
    taskId: 't-ctx',
    attempt: 2,
    fence: 17,
    kind: 'node.ctx',
    queue: 'q1',
    timeoutMs: 30000,
    lastCheckpoint: { step: 3 },
  });
});

test('an async handler', async (t) => {
  const d = await worker(t);
  const [done] = await d.run('node.async', 21);
  assert.deepEqual(done.result, { doubled: 42 });
});

test('a thrown error -> failed, retryable, "Name: message"', async (t) => {
  const d = await worker(t);
  const [failed] = await d.run('node.boom', null, { task_id: 't-boom' });
  assert.deepEqual(failed, { type: 'failed', task_id: 't-boom', error: 'TypeError: kaboom', retryable: true });
});

test('a long error message is cut to about 4 KiB', async (t) => {
  const d = await worker(t);
  const [failed] = await d.run('node.reject', null);
  assert.equal(failed.retryable, true);
  assert.match(failed.error, /^RangeError: xxxx/);
  assert.match(failed.error, /\[truncated 10012 bytes\]$/);
  assert.ok(Buffer.byteLength(failed.error) <= 4096, `${Buffer.byteLength(failed.error)} bytes`);
});

test('PermanentError -> failed, not retryable', async (t) => {
  const d = await worker(t);
  const [failed] = await d.run('node.perm', null);
  assert.equal(failed.type, 'failed');
  assert.equal(failed.error, 'PermanentError: bad input');
  assert.equal(failed.retryable, false);
});

test("a result over the drone's frame limit (HIVE_POOL_MAX_FRAME) fails for good", async (t) => {
  const d = await worker(t, ['tasks.js'], { env: { HIVE_POOL_MAX_FRAME: '2048' } });
  const [fits] = await d.run('node.echo', 'x'.repeat(1000));
  assert.equal(fits.type, 'done', JSON.stringify(fits));
  const [big] = await d.run('node.echo', 'x'.repeat(4000));
  assert.equal(big.type, 'failed');
  assert.equal(big.retryable, false);
  assert.match(big.error, /over the drone's 2048-byte frame limit/);
});

test('a result that is not JSON -> failed, not retryable, saying why', async (t) => {
  const d = await worker(t);
  const [big] = await d.run('node.bigint', null);
  assert.equal(big.type, 'failed');
  assert.equal(big.retryable, false);
  assert.match(big.error, /^the result is not JSON-serializable: TypeError: .*BigInt/);
  const [circ] = await d.run('node.circular', null);
  assert.equal(circ.retryable, false);
  assert.match(circ.error, /^the result is not JSON-serializable: TypeError: .*circular/i);
  // The process is still fine.
  const [ok] = await d.run('node.echo', 1);
  assert.equal(ok.result, 1);
});

test('ctx.checkpoint sends a checkpoint frame before done; lastCheckpoint comes from run', async (t) => {
  const d = await worker(t);
  const msgs = await d.run('node.checkpoint', null, { task_id: 't-cp', checkpoint: { step: 0 } });
  assert.deepEqual(msgs, [
    { type: 'checkpoint', task_id: 't-cp', data: { step: 1, seen: { step: 0 } } },
    {
      type: 'done',
      task_id: 't-cp',
      result: { before: { step: 0 }, after: { step: 1, seen: { step: 0 } } },
    },
  ]);
});

test('a kind the worker does not have -> failed, not retryable', async (t) => {
  const d = await worker(t);
  const [failed] = await d.run('node.nope', null);
  assert.equal(failed.retryable, false);
  assert.match(failed.error, /no handler for kind "node\.nope"/);
});

test('many tasks in a row, each answered in order', async (t) => {
  const d = await worker(t);
  for (let i = 0; i < 300; i++) {
    const [done] = await d.run(i % 2 ? 'node.echo' : 'node.async', i, { task_id: `t-${i}` });
    assert.equal(done.task_id, `t-${i}`);
    assert.deepEqual(done.result, i % 2 ? i : { doubled: 2 * i });
  }
});

test('a second run that arrives early waits for the first', async (t) => {
  const d = await worker(t);
  d.send({ type: 'run', task_id: 'a', attempt: 1, fence: 1, kind: 'node.async', queue: 'q', payload: 1, checkpoint: null });
  d.send({ type: 'run', task_id: 'b', attempt: 1, fence: 2, kind: 'node.echo', queue: 'q', payload: 2, checkpoint: null });
  assert.deepEqual(await d.next(), { type: 'done', task_id: 'a', result: { doubled: 2 } });
  assert.deepEqual(await d.next(), { type: 'done', task_id: 'b', result: 2 });
});

test('end-of-file on the channel -> exit 0', async (t) => {
  const d = await worker(t);
  d.close();
  assert.deepEqual(await d.exit(), { code: 0, signal: null });
});

test('end-of-file while a handler runs -> exit 0', async (t) => {
  const d = await worker(t);
  d.send({ type: 'run', task_id: 'h', attempt: 1, fence: 1, kind: 'node.hang', queue: 'q', payload: null, checkpoint: null });
  d.close();
  assert.deepEqual(await d.exit(), { code: 0, signal: null });
});

test('a frame that is not JSON from the drone -> exit 1 naming it', async (t) => {
  const d = await worker(t);
  const { encodeFrame } = require('../lib/frames');
  d.socket.write(encodeFrame('not json'));
  const { code } = await d.exit();
  assert.equal(code, 1);
  assert.match(d.stderr, /not JSON/);
});

test('tasks as plain exports, and ESM default exports', async (t) => {
  const d = await worker(t, ['exported.js', './exported.mjs']);
  assert.deepEqual(d.ready.kinds.sort(), ['node.esm', 'node.exported', 'node.other']);
  assert.deepEqual((await d.run('node.exported', 'x'))[0].result, { hello: 'x' });
  assert.deepEqual((await d.run('node.other', 'y'))[0].result, 'other:y');
  assert.deepEqual((await d.run('node.esm', 'z'))[0].result, { esm: 'z' });
});

test('an ES module .js file (in a "type": "module" package) that calls task()', async (t) => {
  const d = await worker(t, ['esm-pkg/tasks.js']);
  assert.deepEqual(d.ready.kinds, ['node.esm-task']);
  assert.deepEqual((await d.run('node.esm-task', 5))[0].result, { esm: true, attempt: 1, payload: 5 });
});

async function failsToStart(t, modules, options) {
  const d = await FakeDrone.start(modules, options);
  t.after(() => d.kill());
  const { code } = await d.exit();
  assert.notEqual(code, 0);
  assert.equal(d.inbox.length, 0, 'no ready was sent');
  return d.stderr;
}

test('HIVE_POOL_FD missing -> a clear error, non-zero exit', async (t) => {
  const stderr = await failsToStart(t, ['tasks.js'], { fd: null });
  assert.match(stderr, /HIVE_POOL_FD is not set/);
  assert.match(stderr, /\[\[pool\]\]/);
});

test('HIVE_POOL_FD invalid -> a clear error, non-zero exit', async (t) => {
  assert.match(await failsToStart(t, ['tasks.js'], { fd: 'three' }), /HIVE_POOL_FD must be a file descriptor number, got "three"/);
  assert.match(await failsToStart(t, ['tasks.js'], { fd: '77' }), /HIVE_POOL_FD=77 is not an open file descriptor \(EBADF\)/);
  assert.match(await failsToStart(t, ['tasks.js'], { fd: '0' }), /HIVE_POOL_FD=0 is not a socket/);
});

test('a module without tasks -> a clear error', async (t) => {
  assert.match(await failsToStart(t, ['empty.js']), /task module empty\.js defines no tasks/);
});

test('a module that throws at load -> its error', async (t) => {
  const stderr = await failsToStart(t, ['throws.js']);
  assert.match(stderr, /loading task module throws\.js failed: Error: the tasks module is broken on purpose/);
});

test('a module that does not exist -> a clear error', async (t) => {
  assert.match(await failsToStart(t, ['nope.js']), /cannot find task module nope\.js/);
});

test('a built-in kind is refused', async (t) => {
  assert.match(await failsToStart(t, ['builtin.js']), /kind "echo" is built into the drone/);
});

test('no module, or no command -> usage', async (t) => {
  assert.match(await failsToStart(t, [], { args: ['worker'] }), /give at least one task module/);
  assert.match(await failsToStart(t, [], { args: ['serve'] }), /unknown command "serve"/);
});
