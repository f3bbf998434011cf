'use strict';
/**
 * The worker side of the drone's local protocol v1 (docs/POOLS.md): say `ready` with the
 * kinds this process handles, then run one task per `run` message and answer `done` or
 * `failed`, sending `checkpoint` messages a handler asks for in between.
 */

const fs = require('node:fs');
const net = require('node:net');
const { inspect } = require('node:util');
const { FrameParser, encodeFrame, DEFAULT_MAX_FRAME } = require('./frames');
const { isPermanent } = require('./errors');

const PROTOCOL = 1;
/** An error text is kept to about this many bytes (the rest is cut and marked). */
const MAX_ERROR_BYTES = 4096;
/** The largest checkpoint the drone and queen keep (docs/POOLS.md). */
const MAX_CHECKPOINT_BYTES = 64 * 1024;

const SDK = `hive-node/${require('../package.json').version}`;

/** What a handler is given besides its payload: the task's lease and a way to checkpoint. */
class Context {
  /**
   * @param {any} run the `run` message
   * @param {Worker} worker
   */
  constructor(run, worker) {
    /** @type {string} */
    this.taskId = run.task_id;
    /** @type {number} 1 for the first attempt */
    this.attempt = run.attempt;
    /** @type {number} the lease's fence: pass it on to make your own writes conditional */
    this.fence = run.fence;
    /** @type {string} */
    this.kind = run.kind;
    /** @type {string} */
    this.queue = run.queue;
    /** @type {number | null} the attempt's timeout (the drone enforces it) */
    this.timeoutMs = run.timeout_ms === undefined ? null : run.timeout_ms;
    /** @type {any} the last checkpoint: an earlier attempt's, then this one's latest */
    this.lastCheckpoint = run.checkpoint === undefined ? null : run.checkpoint;
    /** @type {boolean} whether the attempt's outcome has been sent */
    this.ended = false;
    /** @private */
    this._worker = worker;
  }

  /**
   * Replaces the task's checkpoint with `data` (any JSON, at most 64 KiB serialized). The
   * drone sends it to the queen with its next heartbeat; a later attempt of the task gets
   * it as `ctx.lastCheckpoint`. Resolves once it is written to the drone's channel.
   * Throws (synchronously) if `data` is not JSON or too large. After the attempt has
   * ended it does nothing.
   * @param {any} data
   * @returns {Promise<void>}
   */
  checkpoint(data) {
    const json = JSON.stringify(data);
    if (json === undefined) throw new TypeError('a checkpoint must be a JSON value');
    const size = Buffer.byteLength(json);
    if (size > MAX_CHECKPOINT_BYTES) {
      throw new RangeError(`checkpoint is ${size} bytes of JSON, over the ${MAX_CHECKPOINT_BYTES}-byte limit`);
    }
    if (this.ended) {
      this._worker.warn(`checkpoint of task ${this.taskId} after its attempt ended: ignored`);
      return Promise.resolve();
    }
    this.lastCheckpoint = data;
    const frame = '{"type":"checkpoint","task_id":' + JSON.stringify(this.taskId) + ',"data":' + json + '}';
    return new Promise((resolve) => this._worker.write(frame, () => resolve()));
  }
}

/**
 * "Name: message" of a thrown value, cut to about MAX_ERROR_BYTES.
 * @param {unknown} err
 * @returns {string}
 */
function describeError(err) {
  let text;
  if (err instanceof Error || (err !== null && typeof err === 'object' && typeof (/** @type {any} */ (err).message) === 'string')) {
    const e = /** @type {any} */ (err);
    const name = typeof e.name === 'string' && e.name ? e.name : 'Error';
    text = e.message ? `${name}: ${e.message}` : name;
  } else if (typeof err === 'string') {
    text = err;
  } else {
    text = `non-error thrown: ${inspect(err, { depth: 2, breakLength: Infinity })}`;
  }
  return capBytes(text, MAX_ERROR_BYTES);
}

/**
 * @param {string} text
 * @param {number} max
 */
function capBytes(text, max) {
  if (text.length * 3 <= max) return text;
  const buf = Buffer.from(text);
  if (buf.length <= max) return text;
  const marker = ` [truncated ${buf.length} bytes]`;
  let cut = max - marker.length;
  while (cut > 0 && (buf[cut] & 0xc0) === 0x80) cut--; // not inside a UTF-8 sequence
  return buf.toString('utf8', 0, cut) + marker;
}

/** One process's side of a drone channel. */
class Worker {
  /**
   * @param {net.Socket} socket
   * @param {Map<string, Function>} handlers
   * @param {{maxFrame?: number, onFatal?: (message: string) => void, log?: (line: string) => void}} [options]
   */
  constructor(socket, handlers, options = {}) {
    this.socket = socket;
    this.handlers = handlers;
    this.maxFrame = options.maxFrame || DEFAULT_MAX_FRAME;
    this.log = options.log || ((line) => process.stderr.write(line + '\n'));
    this.onFatal = options.onFatal || ((message) => {
      this.log(`hive-worker: ${message}`);
      process.exit(1);
    });
    /** @type {Context | null} */
    this.current = null;
    /** @type {any[]} runs that arrived while one was running (the drone sends one at a time) */
    this.queued = [];
    this.warned = false;
    this.parser = new FrameParser((body) => this.onFrame(body), Math.max(this.maxFrame, 64 * 1024 * 1024));
    socket.on('data', (chunk) => {
      try {
        this.parser.push(chunk);
      } catch (e) {
        this.onFatal(`bad frame from the drone: ${describeError(e)}`);
      }
    });
  }

  /** Sends `ready` with the kinds this process handles. */
  ready() {
    const kinds = [...this.handlers.keys()];
    this.write(JSON.stringify({ type: 'ready', protocol: PROTOCOL, kinds, sdk: SDK, pid: process.pid }));
  }

  /**
   * @param {string} json
   * @param {() => void} [cb]
   */
  write(json, cb) {
    this.socket.write(encodeFrame(json), cb);
  }

  /** @param {string} line */
  warn(line) {
    this.log(`hive-worker: ${line}`);
  }

  /** @param {string} body */
  onFrame(body) {
    let msg;
    try {
      msg = JSON.parse(body);
    } catch (e) {
      this.onFatal(`a frame from the drone is not JSON: ${describeError(e)}`);
      return;
    }
    if (msg === null || typeof msg !== 'object' || msg.type !== 'run') {
      this.onFatal(`unexpected message from the drone: ${capBytes(body, 200)}`);
      return;
    }
    if (this.current) this.queued.push(msg);
    else this.start(msg);
  }

  /** @param {any} run */
  start(run) {
    const ctx = new Context(run, this);
    this.current = ctx;
    const handler = this.handlers.get(run.kind);
    if (handler === undefined) {
      this.fail(ctx, `this worker has no handler for kind ${JSON.stringify(run.kind)}`, false);
      return;
    }
    let out;
    try {
      out = handler(run.payload === undefined ? null : run.payload, ctx);
    } catch (e) {
      this.fail(ctx, describeError(e), !isPermanent(e));
      return;
    }
    if (out !== null && (typeof out === 'object' || typeof out === 'function') && typeof out.then === 'function') {
      try {
        out.then(
          (value) => this.done(ctx, value),
          (e) => this.fail(ctx, describeError(e), !isPermanent(e)),
        );
      } catch (e) {
        this.fail(ctx, describeError(e), !isPermanent(e)); // a thenable whose then() throws
      }
    } else {
      this.done(ctx, out);
    }
  }

  /**
   * @param {Context} ctx
   * @param {unknown} value
   */
  done(ctx, value) {
    if (ctx.ended) return;
    let json;
    try {
      json = JSON.stringify(value);
    } catch (e) {
      this.fail(ctx, `the result is not JSON-serializable: ${describeError(e)}`, false);
      return;
    }
    if (json === undefined) json = 'null'; // undefined, a function, a symbol
    const frame = '{"type":"done","task_id":' + JSON.stringify(ctx.taskId) + ',"result":' + json + '}';
    const size = Buffer.byteLength(frame);
    if (size > this.maxFrame) {
      this.fail(ctx, `the result is ${size} bytes of JSON, over the drone's ${this.maxFrame}-byte frame limit`, false);
      return;
    }
    this.end(ctx, frame);
  }

  /**
   * @param {Context} ctx
   * @param {string} error
   * @param {boolean} retryable
   */
  fail(ctx, error, retryable) {
    if (ctx.ended) return;
    const frame = '{"type":"failed","task_id":' + JSON.stringify(ctx.taskId) + ',"error":' + JSON.stringify(error) + ',"retryable":' + retryable + '}';
    this.end(ctx, frame);
  }

  /**
   * @param {Context} ctx
   * @param {string} frame
   */
  end(ctx, frame) {
    ctx.ended = true;
    this.write(frame);
    this.current = null;
    if (this.queued.length > 0) this.start(this.queued.shift());
  }
}

/**
 * Checks `HIVE_POOL_FD` and opens the channel it names.
 * @param {string | undefined} value
 * @returns {net.Socket}
 */
function openChannel(value) {
  if (value === undefined || value === '') {
    throw new Error(
      'HIVE_POOL_FD is not set: hive-worker is started by a drone for a [[pool]] of its config ' +
        '(docs/POOLS.md), which passes it the channel',
    );
  }
  if (!/^\d+$/.test(value)) {
    throw new Error(`HIVE_POOL_FD must be a file descriptor number, got ${JSON.stringify(value)}`);
  }
  const fd = Number(value);
  let stat;
  try {
    stat = fs.fstatSync(fd);
  } catch (e) {
    throw new Error(`HIVE_POOL_FD=${fd} is not an open file descriptor (${/** @type {any} */ (e).code || e})`);
  }
  if (!stat.isSocket()) {
    throw new Error(`HIVE_POOL_FD=${fd} is not a socket`);
  }
  return new net.Socket({ fd, readable: true, writable: true });
}

/**
 * Serves the drone on the channel `HIVE_POOL_FD` names (or `options.socket`) with
 * `handlers` until the drone closes it, then exits the process with status 0.
 * @param {Map<string, Function>} handlers
 * @param {{env?: NodeJS.ProcessEnv, socket?: net.Socket}} [options]
 * @returns {Worker}
 */
function serve(handlers, options = {}) {
  if (handlers.size === 0) throw new Error('no task handlers to serve');
  const socket = options.socket || openChannel((options.env || process.env).HIVE_POOL_FD);
  const limit = Number((options.env || process.env).HIVE_POOL_MAX_FRAME);
  // A drone before HIVE_POOL_MAX_FRAME, or a value that makes no sense: the default.
  const maxFrame = Number.isInteger(limit) && limit >= 1024 ? limit : DEFAULT_MAX_FRAME;
  const worker = new Worker(socket, handlers, { maxFrame });
  socket.on('end', () => process.exit(0));
  socket.on('error', (e) => {
    worker.warn(`the drone's channel failed: ${describeError(e)}`);
    process.exit(1);
  });
  worker.ready();
  return worker;
}

module.exports = { Worker, Context, serve, openChannel, describeError, capBytes, SDK, PROTOCOL, MAX_ERROR_BYTES };
