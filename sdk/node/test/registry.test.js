'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');

/** A second, independent copy of an SDK module, as a dependency's own copy would be. */
function freshCopy(id) {
  const file = require.resolve(id);
  const saved = require.cache[file];
  delete require.cache[file];
  try {
    return require(file);
  } finally {
    require.cache[file] = saved;
  }
}

test('two copies of the SDK share one registry', () => {
  const a = require('../lib/registry');
  const b = freshCopy('../lib/registry');
  assert.notEqual(a, b);
  const handler = () => 1;
  b.task('copy.kind', handler);
  assert.equal(a.registry().get('copy.kind'), handler);
  assert.equal(globalThis[Symbol.for('the-hive.registry')], a.registry());
});

test('a PermanentError of another copy is permanent', () => {
  const a = require('../lib/errors');
  const b = freshCopy('../lib/errors');
  assert.notEqual(a.PermanentError, b.PermanentError);
  assert.equal(a.isPermanent(new b.PermanentError('x')), true);
  assert.equal(a.isPermanent(Object.assign(new Error('y'), { retryable: false })), true);
  assert.equal(a.isPermanent(new Error('z')), false);
  assert.equal(a.isPermanent('str'), false);
});

test('task() checks kinds and refuses a second handler', () => {
  const { task } = require('..');
  const h = () => 2;
  assert.equal(task('reg.one', h), h);
  assert.equal(task('reg.one', h), h); // the same handler again is fine
  assert.throws(() => task('reg.one', () => 3), /already has a handler/);
  assert.throws(() => task('has space', h), /invalid kind "has space"/);
  assert.throws(() => task('', h), /invalid kind/);
  assert.throws(() => task('x'.repeat(129), h), /invalid kind/);
  assert.throws(() => task('exec', h), /built into the drone/);
  assert.throws(() => task('reg.two', 'nope'), /must be a function/);
});

test('registerExports takes functions, reads an ESM default object, skips the rest', () => {
  const { registerExports, registry } = require('../lib/registry');
  const f = () => 1;
  const g = () => 2;
  const n = registerExports({ 'exp.f': f, version: 3, default: { 'exp.g': g } }, 'm.js');
  assert.equal(n, 2);
  assert.equal(registry().get('exp.f'), f);
  assert.equal(registry().get('exp.g'), g);
  assert.throws(() => registerExports({ 'bad name': f }, 'm.js'), /m\.js: exported invalid kind "bad name"/);
});

test('describeError formats thrown values', () => {
  const { describeError } = require('../lib/worker');
  assert.equal(describeError(new TypeError('a')), 'TypeError: a');
  assert.equal(describeError(new Error('')), 'Error');
  class MyErr extends Error {
    constructor() {
      super('mine');
      this.name = 'MyErr';
    }
  }
  assert.equal(describeError(new MyErr()), 'MyErr: mine');
  assert.equal(describeError('plain string'), 'plain string');
  assert.equal(describeError({ message: 'like an error' }), 'Error: like an error');
  assert.equal(describeError(42), 'non-error thrown: 42');
  assert.equal(describeError(undefined), 'non-error thrown: undefined');
  const long = describeError(new Error('é'.repeat(5000)));
  assert.ok(Buffer.byteLength(long) <= 4096);
  assert.ok(!long.includes('\ufffd'), 'not cut inside a character');
});
