'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { FrameParser, encodeFrame } = require('../lib/frames');

function parseAll(chunks, maxLen) {
  const out = [];
  const p = new FrameParser((body) => out.push(JSON.parse(body)), maxLen);
  for (const c of chunks) p.push(c);
  return { out, buffered: p.buffered };
}

const messages = [
  { type: 'run', task_id: 'a', payload: { text: 'héllo ✓ 🐝' } },
  { type: 'run', task_id: 'b', payload: 'x'.repeat(70000) },
  { type: 'run', task_id: 'c', payload: null },
];
const stream = Buffer.concat(messages.map((m) => encodeFrame(JSON.stringify(m))));

test('encodeFrame writes a big-endian length and the UTF-8 body', () => {
  const f = encodeFrame('{"a":"é"}');
  assert.equal(f.readUInt32BE(0), Buffer.byteLength('{"a":"é"}'));
  assert.equal(f.subarray(4).toString('utf8'), '{"a":"é"}');
});

test('frames in one chunk', () => {
  const { out, buffered } = parseAll([stream]);
  assert.deepEqual(out, messages);
  assert.equal(buffered, 0);
});

test('frames split at every byte boundary (1-byte chunks)', () => {
  const chunks = [];
  for (let i = 0; i < stream.length; i++) chunks.push(stream.subarray(i, i + 1));
  assert.deepEqual(parseAll(chunks).out, messages);
});

test('frames split at every possible single cut point, and at odd chunk sizes', () => {
  const small = Buffer.concat(messages.filter((m) => m.task_id !== 'b').map((m) => encodeFrame(JSON.stringify(m))));
  for (let cut = 0; cut <= small.length; cut++) {
    const { out } = parseAll([small.subarray(0, cut), small.subarray(cut)]);
    assert.equal(out.length, 2, `cut at ${cut}`);
  }
  for (const size of [3, 5, 4096, 65537]) {
    const chunks = [];
    for (let i = 0; i < stream.length; i += size) chunks.push(stream.subarray(i, i + size));
    assert.deepEqual(parseAll(chunks).out, messages, `chunks of ${size}`);
  }
});

test('an incomplete frame stays buffered', () => {
  const { out, buffered } = parseAll([stream.subarray(0, stream.length - 1)]);
  assert.equal(out.length, 2);
  assert.ok(buffered > 0);
});

test('a frame over the limit is refused', () => {
  const p = new FrameParser(() => {}, 10);
  assert.throws(() => p.push(encodeFrame('{"too":"long"}')), /over the limit of 10/);
});
