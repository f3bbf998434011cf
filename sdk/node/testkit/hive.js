'use strict';
// A real queen and real drones for the integration tests: started on ephemeral ports in a
// temp dir, each in its own process group, and all killed by `stop()` whatever happened.
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn, spawnSync } = require('node:child_process');
const { Client } = require('..');
const { cleanEnv } = require('./fake-drone');

const SDK_DIR = path.resolve(__dirname, '..');
const REPO_ROOT = path.resolve(SDK_DIR, '..', '..');
const BIN = path.join(SDK_DIR, 'bin', 'hive-worker.js');
const FIXTURES = path.join(__dirname, 'fixtures');

/** How long anything may take before a test gives up on it (a hung process, a lost task). */
const DEADLINE_MS = 20000;

/** Fast failure detection, as the Rust tests' FAST_LEASES: heartbeats every 200 ms, a silent
 * drone lost after 1 s, 300 ms to reconnect, retries after ~100 ms. */
const FAST_LEASES = {
  HIVE_LEASES__HEARTBEAT_INTERVAL_MS: '200',
  HIVE_LEASES__HEARTBEAT_TIMEOUT_MS: '1000',
  HIVE_LEASES__RECONNECT_GRACE_MS: '300',
  HIVE_TASKS__RETRY_BASE_MS: '100',
};

function binary(envName, name) {
  if (process.env[envName]) return process.env[envName];
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO_ROOT, 'target');
  return path.join(target, 'debug', name);
}

const QUEEN_BIN = binary('HIVE_QUEEN_BIN', 'queen');
const DRONE_BIN = binary('HIVE_DRONE_BIN', 'drone');

/** Why the integration tests cannot run here, or null if they can. */
function unavailable() {
  for (const bin of [QUEEN_BIN, DRONE_BIN]) {
    if (!fs.existsSync(bin)) return `${bin} does not exist (cargo build, or set HIVE_QUEEN_BIN / HIVE_DRONE_BIN)`;
  }
  const help = spawnSync(DRONE_BIN, ['--help'], { encoding: 'utf8' });
  if (!String(help.stdout).includes('--pool')) return `${DRONE_BIN} has no worker pools (no --pool in its --help)`;
  return null;
}

/**
 * Calls `fn` until it returns something truthy (or resolves to it), every `everyMs`; throws
 * naming `what` after `deadlineMs`.
 * @template T
 * @param {string} what
 * @param {() => T | Promise<T>} fn
 * @returns {Promise<T>}
 */
async function until(what, fn, { deadlineMs = DEADLINE_MS, everyMs = 20 } = {}) {
  const deadline = Date.now() + deadlineMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Whether `pid` is a live process (a zombie is not). */
function alive(pid) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return false;
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  return state !== 'Z' && state !== 'X';
}

/** A TOML value: JSON strings, numbers, arrays and inline tables are TOML too. */
function toml(v) {
  if (Array.isArray(v)) return `[${v.map(toml).join(', ')}]`;
  if (v !== null && typeof v === 'object') {
    return `{ ${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)} = ${toml(x)}`).join(', ')} }`;
  }
  return JSON.stringify(v);
}

/** A pool table running `hive-worker worker <modules>` with this SDK. */
function nodePool(name, modules, extra = {}) {
  return {
    name,
    command: [process.execPath, BIN, 'worker', ...modules.map((m) => path.resolve(FIXTURES, m))],
    processes: 1,
    ...extra,
  };
}

class Proc {
  constructor(label, child, log) {
    this.label = label;
    this.child = child;
    this.log = log;
    this.output = '';
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    const out = fs.openSync(log, 'a');
    const collect = (chunk) => {
      this.output += chunk;
      fs.writeSync(out, chunk);
    };
    if (child.stdout) child.stdout.setEncoding('utf8').on('data', collect);
    child.stderr.setEncoding('utf8').on('data', collect);
    child.on('close', () => fs.closeSync(out));
  }

  get pid() {
    return this.child.pid;
  }

  get running() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** SIGKILL to the process alone (its children must notice by themselves). */
  kill9() {
    if (this.running) process.kill(this.pid, 'SIGKILL');
  }

  /** SIGKILL to its whole process group. */
  killGroup() {
    try {
      process.kill(-this.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }

  tail(n = 4000) {
    return this.output.slice(-n);
  }
}

/** Hives not stopped yet: killed when this process exits, however it exits but SIGKILL. */
const live = new Set();
function killAll() {
  for (const hive of live) hive.killNow();
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    killAll();
    process.exit(128 + (os.constants.signals[sig] || 0));
  });
}

class Hive {
  constructor() {
    live.add(this);
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hive-node-it-'));
    /** @type {Proc[]} */
    this.procs = [];
    /** Pids of pool processes the tests learned, killed by stop() if still around. */
    this.workerPids = new Set();
    this.queen = null;
    this.client = null;
    this.drones = new Map();
  }

  _spawn(label, bin, args, env, stdio = ['ignore', 'pipe', 'pipe']) {
    const child = spawn(bin, args, { env, stdio, detached: true, cwd: this.dir });
    const proc = new Proc(label, child, path.join(this.dir, `${label}.log`));
    this.procs.push(proc);
    return proc;
  }

  async startQueen(env = {}) {
    const proc = this._spawn('queen', QUEEN_BIN, [], cleanEnv({
      RUST_LOG: process.env.HIVE_TEST_RUST_LOG || 'info',
      ...FAST_LEASES,
      ...env,
      HIVE_QUEEN__LISTEN: '127.0.0.1:0',
      HIVE_QUEEN__HTTP: '127.0.0.1:0',
      HIVE_QUEEN__DATA_DIR: path.join(this.dir, 'data'),
    }));
    const line = await until('the queen to print `ready`', () => {
      if (!proc.running) throw new Error(`the queen exited:\n${proc.tail()}`);
      return /^ready drones=(\S+) http=(\S+)/m.exec(proc.output);
    });
    this.queen = proc;
    this.dronesAddr = line[1];
    this.httpAddr = line[2];
    this.client = new Client({ baseUrl: `http://${this.httpAddr}`, retries: 0 });
    return proc;
  }

  /** Writes a drone config and starts `drone --config` with it; does not wait. */
  spawnDrone(name, { pools = [], slots = 4, labels = [], extra = {} } = {}) {
    const lines = [
      `queen = ${toml(this.dronesAddr)}`,
      `slots = ${slots}`,
      `name = ${toml(name)}`,
      `labels = ${toml([`hive-test:${name}`, ...labels])}`,
      'kill_grace_ms = 500',
      ...Object.entries(extra).map(([k, v]) => `${k} = ${toml(v)}`),
    ];
    for (const pool of pools) {
      lines.push('', '[[pool]]');
      for (const [k, v] of Object.entries(pool)) lines.push(`${k} = ${toml(v)}`);
    }
    const file = path.join(this.dir, `${name}.toml`);
    fs.writeFileSync(file, lines.join('\n') + '\n');
    const proc = this._spawn(`drone-${name}`, DRONE_BIN, ['--config', file], cleanEnv({
      RUST_LOG: process.env.HIVE_TEST_RUST_LOG || 'info',
    }));
    this.drones.set(name, proc);
    return proc;
  }

  /** Starts a drone and waits until the queen lists it (its pools are ready by then). */
  async startDrone(name, options) {
    const proc = this.spawnDrone(name, options);
    const drone = await until(`drone ${name} to connect`, async () => {
      if (!proc.running) throw new Error(`drone ${name} exited:\n${proc.tail()}`);
      return (await this.client.drones()).find((d) => d.name === name && d.connected);
    });
    proc.info = drone;
    return proc;
  }

  /** Runs `fn` and, if it throws, adds the processes' log tails to its error. */
  async explain(fn) {
    try {
      return await fn();
    } catch (e) {
      const logs = this.procs.map((p) => `----- ${p.label} (pid ${p.pid}), ${p.log}:\n${p.tail(3000)}`).join('\n');
      if (e && typeof e === 'object') e.message = `${e.message}\n${logs}`;
      throw e;
    }
  }

  /** SIGKILL to everything it started, at once. */
  killNow() {
    for (const p of this.procs) p.killGroup();
    for (const pid of this.workerPids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }

  /** Kills everything it started and removes its temp dir. */
  async stop() {
    if (this.client) this.client.close();
    this.killNow();
    live.delete(this);
    await Promise.all(this.procs.map((p) => p.exited));
    if (!process.env.HIVE_TEST_KEEP) fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

module.exports = { Hive, until, alive, nodePool, unavailable, FIXTURES, DEADLINE_MS };
