'use strict';
// End-to-end throughput of no-op tasks through a real queen, a drone and its hive-worker pool:
//
//   HIVE_QUEEN_BIN=... HIVE_DRONE_BIN=... node bench/throughput.js [TASKS] [PROCESSES] [SLOTS]
//
// It submits TASKS no-op tasks in batches of 1000 and reports the tasks per second from the
// first submit to the last success, for the pool's kind (node.echo) and, as the ceiling the
// queen and drone allow, the drone's built-in `echo`.
const path = require('node:path');
const { Hive, nodePool, unavailable } = require('../testkit/hive');

const TASKS = Number(process.argv[2] || 5000);
const PROCESSES = Number(process.argv[3] || 2);
const SLOTS = Number(process.argv[4] || 16);

async function measure(client, kind) {
  const before = (await client.stats()).by_state.succeeded;
  const started = process.hrtime.bigint();
  for (let i = 0; i < TASKS; i += 1000) {
    const n = Math.min(1000, TASKS - i);
    await client.batch(Array.from({ length: n }, (_, j) => ({ kind, payload: i + j })));
  }
  for (;;) {
    const s = await client.stats();
    if (s.by_state.succeeded - before >= TASKS) break;
    if (s.by_state.failed > 0) throw new Error(`tasks failed: ${JSON.stringify(s.by_state)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const secs = Number(process.hrtime.bigint() - started) / 1e9;
  return TASKS / secs;
}

(async () => {
  const missing = unavailable();
  if (missing) throw new Error(missing);
  const hive = new Hive();
  try {
    await hive.startQueen({ RUST_LOG: 'warn' });
    await hive.startDrone('bench', {
      slots: SLOTS,
      pools: [nodePool('node', [path.join(__dirname, '..', 'testkit', 'fixtures', 'tasks.js')], { processes: PROCESSES })],
    });
    const c = hive.client;
    await measure(c, 'node.echo'); // warm up
    const pool = await measure(c, 'node.echo');
    const builtin = await measure(c, 'echo');
    console.log(`${TASKS} tasks, ${PROCESSES} pool processes, ${SLOTS} slots:`);
    console.log(`  node.echo (hive-worker pool): ${pool.toFixed(0)} tasks/s`);
    console.log(`  echo (built into the drone):  ${builtin.toFixed(0)} tasks/s`);
  } finally {
    await hive.stop();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
