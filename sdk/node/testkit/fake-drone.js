'use strict';
// A fake drone: spawns `hive-worker worker ...` with one end of a Unix socket connection as
// its fd 3 (HIVE_POOL_FD=3), and speaks the local protocol on the other end.
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const { spawn } = require('node:child_process');
const { FrameParser, encodeFrame } = require('../lib/frames');

const BIN = path.join(__dirname, '..', 'bin', 'hive-worker.js');
const FIXTURES = path.join(__dirname, 'fixtures');
/** Bounds every wait, so a broken worker fails a test instead of hanging it. */
const DEADLINE_MS = 10000;

/** The environment without the runner's HIVE_* variables. */
function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('HIVE_')) env[k] = v;
  return { ...env, ...extra };
}

/**
 * @param {Promise<T>} promise
 * @param {string} what
 * @template T
 * @returns {Promise<T>}
 */
function within(promise, what, ms = DEADLINE_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A connected pair of Unix sockets: `[ours, theirs]`. */
async function socketPair() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hive-node-pair-'));
  const file = path.join(dir, 'sock');
  const server = net.createServer();
  server.listen(file);
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const theirs = net.connect(file);
  await once(theirs, 'connect');
  const [ours] = await accepted;
  server.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return [ours, theirs];
}

class FakeDrone {
  /**
   * @param {string[]} modules paths of task modules (relative to the fixtures directory)
   * @param {{env?: Record<string, string>, fd?: string | null, args?: string[]}} [options]
   */
  static async start(modules, options = {}) {
    const [ours, theirs] = await socketPair();
    const env = cleanEnv(options.env);
    if (options.fd !== null) env.HIVE_POOL_FD = options.fd === undefined ? '3' : options.fd;
    const args = options.args || ['worker', ...modules];
    const child = spawn(process.execPath, [BIN, ...args], {
      cwd: FIXTURES,
      env,
      stdio: ['ignore', 'pipe', 'pipe', theirs],
    });
    theirs.destroy(); // the worker has its own copy
    return new FakeDrone(ours, child);
  }

  constructor(socket, child) {
    this.socket = socket;
    this.child = child;
    this.stdout = '';
    this.stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s) => (this.stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s) => (this.stderr += s));
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    /** @type {any[]} */
    this.inbox = [];
    /** @type {((m: any) => void)[]} */
    this.waiting = [];
    this.closed = false;
    const parser = new FrameParser((body) => {
      const msg = JSON.parse(body);
      const w = this.waiting.shift();
      if (w) w(msg);
      else this.inbox.push(msg);
    });
    socket.on('data', (chunk) => parser.push(chunk));
    socket.on('error', () => {});
    socket.on('close', () => (this.closed = true));
  }

  /** The next message from the worker. */
  next() {
    if (this.inbox.length > 0) return Promise.resolve(this.inbox.shift());
    return within(new Promise((resolve) => this.waiting.push(resolve)), `a message from the worker (stderr: ${this.stderr})`);
  }

  send(msg) {
    this.socket.write(encodeFrame(JSON.stringify(msg)));
  }

  /** Sends a `run` of `kind` and returns the messages up to its `done` or `failed`. */
  async run(kind, payload, extra = {}) {
    const taskId = extra.task_id || `0190-${Math.random().toString(16).slice(2)}`;
    this.send({
      type: 'run',
      task_id: taskId,
      attempt: 1,
      fence: 7,
      kind,
      queue: 'default',
      payload,
      checkpoint: null,
      timeout_ms: null,
      ...extra,
    });
    const seen = [];
    for (;;) {
      const m = await this.next();
      seen.push(m);
      if (m.type === 'done' || m.type === 'failed') return seen;
    }
  }

  /** Closes the drone's end: the worker should exit 0. */
  close() {
    this.socket.end();
  }

  exit() {
    return within(this.exited, `the worker to exit (stderr: ${this.stderr})`);
  }

  kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    this.socket.destroy();
  }
}

module.exports = { FakeDrone, socketPair, within, cleanEnv, BIN, FIXTURES };
