'use strict';
// Two tasks for a drone's worker pool:
//
//   [[pool]]
//   name = "node"
//   command = ["node", "sdk/node/bin/hive-worker.js", "worker", "sdk/node/examples/tasks.js"]
//
// then: queen submit node.greet --wait --payload '{"name": "bee"}'

/** @param {{name?: string}} payload */
function greet(payload) {
  return { greeting: `hello, ${(payload && payload.name) || 'world'}` };
}

/**
 * Adds up a list of numbers, checkpointing every 1000 so a later attempt resumes.
 * @param {number[]} numbers
 * @param {import('..').Context} ctx
 */
async function sum(numbers, ctx) {
  if (!Array.isArray(numbers)) throw new TypeError('the payload must be an array of numbers');
  let { index = 0, total = 0 } = ctx.lastCheckpoint || {};
  for (; index < numbers.length; index++) {
    total += numbers[index];
    if (index % 1000 === 999) await ctx.checkpoint({ index: index + 1, total });
  }
  return { sum: total, count: numbers.length };
}

module.exports = { 'node.greet': greet, 'node.sum': sum };
