'use strict';
/** A client of the queen's HTTP API (docs/API.md). */

const http = require('node:http');
const https = require('node:https');
const { randomUUID } = require('node:crypto');
const { ApiError, ConnectionError, HiveError, WaitTimeoutError } = require('./errors');

/** The longest `wait_ms` the queen takes in one request. */
const MAX_WAIT_MS = 60000;
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
/** Connection failures worth another try. */
const RETRYABLE_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'ECONNABORTED',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EAI_AGAIN',
]);

/**
 * @typedef {object} ClientOptions
 * @property {string} [baseUrl] the queen's API, default `http://127.0.0.1:8081`
 * @property {string} [token] the queen's client token, sent as `Authorization: Bearer`
 * @property {number} [timeoutMs] how long one request may go without an answer (default 30000)
 * @property {string | Buffer | Array<string | Buffer>} [ca] CA certificate(s) (PEM) for https
 * @property {number} [retries] extra tries after a connection failure (default 3)
 * @property {number} [retryBaseMs] first backoff between tries (default 100, doubling)
 *
 * @typedef {Record<string, any>} Task a task record (docs/API.md, "The task record")
 * @typedef {Record<string, any>} TaskSpec a task spec (docs/API.md, "The task spec")
 */

/**
 * @param {number} ms
 * @returns {Promise<void>}
 */
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Client {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    const {
      baseUrl = 'http://127.0.0.1:8081',
      token,
      timeoutMs = 30000,
      ca,
      retries = 3,
      retryBaseMs = 100,
    } = options;
    const url = new URL(baseUrl);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`baseUrl must be http:// or https://, got ${baseUrl}`);
    }
    this.baseUrl = url;
    this.prefix = url.pathname.replace(/\/+$/, '');
    this.token = token;
    this.timeoutMs = timeoutMs;
    this.retries = retries;
    this.retryBaseMs = retryBaseMs;
    this.transport = url.protocol === 'https:' ? https : http;
    this.agent = new this.transport.Agent({ keepAlive: true, ...(ca ? { ca } : {}) });
  }

  /**
   * Submits one task. An `idempotency_key` is generated when the spec has none, so a
   * request retried after a connection failure never creates a second task.
   * @param {string} kind
   * @param {any} [payload]
   * @param {TaskSpec} [spec] any other spec fields (queue, priority, max_attempts, ...)
   * @returns {Promise<Task>} the new task (or the one the key already named)
   */
  submit(kind, payload, spec = {}) {
    const body = withKey({ ...spec, kind });
    if (payload !== undefined) body.payload = payload;
    return this.request('POST', '/v1/tasks', { body, idempotent: true });
  }

  /**
   * Submits many tasks at once, all or none (each spec gets an `idempotency_key` if it has
   * none).
   * @param {TaskSpec[]} specs
   * @returns {Promise<Task[]>} the tasks, in order
   */
  async batch(specs) {
    const tasks = specs.map((s) => withKey({ ...s }));
    const out = await this.request('POST', '/v1/tasks/batch', { body: { tasks }, idempotent: true });
    return out.tasks;
  }

  /**
   * @param {string} id
   * @returns {Promise<Task>}
   */
  get(id) {
    return this.request('GET', `/v1/tasks/${encodeURIComponent(id)}`);
  }

  /**
   * One page of tasks, newest first. Pass the answer's `next` as `before` for the next.
   * @param {{state?: string, queue?: string, limit?: number, before?: string}} [filter]
   * @returns {Promise<{tasks: Task[], next?: string}>}
   */
  list(filter = {}) {
    return this.request('GET', `/v1/tasks${query(filter)}`);
  }

  /**
   * Every task matching `filter`, newest first, page by page.
   * @param {{state?: string, queue?: string, limit?: number}} [filter]
   * @returns {AsyncGenerator<Task>}
   */
  async *iterate(filter = {}) {
    let before;
    for (;;) {
      const page = await this.list({ ...filter, ...(before ? { before } : {}) });
      yield* page.tasks;
      if (!page.next || page.tasks.length === 0) return;
      before = page.next;
    }
  }

  /**
   * Waits for a task to end (succeeded, failed or cancelled) with the queen's long poll
   * (`wait_ms`, at most 60 s a request, asked again as needed).
   * @param {string} id
   * @param {{timeoutMs?: number}} [options] default: no limit
   * @returns {Promise<Task>} the finished task
   * @throws {WaitTimeoutError} if it has not ended within `timeoutMs`
   */
  async wait(id, options = {}) {
    const timeoutMs = options.timeoutMs === undefined ? Infinity : options.timeoutMs;
    const deadline = Date.now() + timeoutMs;
    const path = `/v1/tasks/${encodeURIComponent(id)}`;
    for (;;) {
      const left = Math.max(0, Math.min(MAX_WAIT_MS, deadline - Date.now()));
      const task = await this.request('GET', `${path}?wait_ms=${Math.floor(left)}`, {
        timeoutMs: this.timeoutMs + left,
      });
      if (TERMINAL.has(task.state)) return task;
      if (Date.now() >= deadline) throw new WaitTimeoutError(id, timeoutMs, task);
    }
  }

  /**
   * Cancels a task that has not finished.
   * @param {string} id
   * @param {string} [reason]
   * @returns {Promise<Task>}
   */
  cancel(id, reason) {
    return this.request('POST', `/v1/tasks/${encodeURIComponent(id)}/cancel`, {
      body: reason === undefined ? undefined : { reason },
    });
  }

  /**
   * Runs a failed or cancelled task again.
   * @param {string} id
   * @returns {Promise<Task>}
   */
  retry(id) {
    return this.request('POST', `/v1/tasks/${encodeURIComponent(id)}/retry`);
  }

  /** @returns {Promise<object[]>} the connected drones */
  async drones() {
    return (await this.request('GET', '/v1/drones')).drones;
  }

  /** @returns {Promise<object[]>} the queues with their counts and settings */
  async queues() {
    return (await this.request('GET', '/v1/queues')).queues;
  }

  /** @returns {Promise<{by_state: object, by_queue: object, drones_connected: number, unroutable: number}>} */
  stats() {
    return this.request('GET', '/v1/stats');
  }

  /** Closes the kept-alive connections. */
  close() {
    this.agent.destroy();
  }

  /**
   * One API call, tried again after a connection failure (with a doubling backoff) when it
   * is safe to: reads, submits (which carry an idempotency key), and any request that
   * never reached the queen (refused, or a kept-alive connection found closed).
   * @param {string} method
   * @param {string} path with its query string
   * @param {{body?: any, idempotent?: boolean, timeoutMs?: number}} [options]
   * @returns {Promise<any>}
   */
  async request(method, path, options = {}) {
    const body = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
    const idempotent = options.idempotent || method === 'GET' || method === 'HEAD';
    for (let attempt = 1; ; attempt++) {
      try {
        return await this._once(method, path, body, options.timeoutMs || this.timeoutMs);
      } catch (e) {
        const err = /** @type {any} */ (e);
        if (!(err instanceof ConnectionError)) throw err;
        const safe = idempotent || err.code === 'ECONNREFUSED' || err.unsent;
        if (!err.retryable || !safe || attempt > this.retries) {
          throw new ConnectionError(
            `${method} ${path}: ${err.message}${attempt > 1 ? ` (after ${attempt} tries)` : ''}`,
            { cause: err.cause, attempts: attempt, code: err.code },
          );
        }
        const backoff = Math.min(this.retryBaseMs * 2 ** (attempt - 1), 5000);
        await delay(backoff / 2 + Math.random() * (backoff / 2));
      }
    }
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {Buffer | undefined} body
   * @param {number} timeoutMs
   * @returns {Promise<any>}
   */
  _once(method, path, body, timeoutMs) {
    /** @type {Record<string, string | number>} */
    const headers = { accept: 'application/json' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (body) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = body.length;
    } else if (method === 'POST') {
      headers['content-length'] = 0;
    }
    return new Promise((resolve, reject) => {
      const req = this.transport.request(
        {
          protocol: this.baseUrl.protocol,
          hostname: this.baseUrl.hostname.replace(/^\[|\]$/g, ''),
          port: this.baseUrl.port || undefined,
          method,
          path: this.prefix + path,
          headers,
          agent: this.agent,
        },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('error', (e) => reject(connectionError(e, false)));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let parsed;
            try {
              parsed = text === '' ? null : JSON.parse(text);
            } catch {
              parsed = undefined;
            }
            const status = res.statusCode || 0;
            if (status >= 400) {
              const message =
                parsed && typeof parsed.error === 'string' ? parsed.error : text || `HTTP ${status}`;
              reject(new ApiError(status, message, { method, path, body: parsed === undefined ? text : parsed }));
            } else if (parsed === undefined) {
              reject(new HiveError(`${method} ${path}: the answer (HTTP ${status}) is not JSON: ${text.slice(0, 200)}`));
            } else {
              resolve(parsed);
            }
          });
        },
      );
      req.setTimeout(timeoutMs, () => {
        const e = /** @type {NodeJS.ErrnoException} */ (new Error(`no answer within ${timeoutMs} ms`));
        e.code = 'ETIMEDOUT';
        req.destroy(e);
      });
      req.on('error', (e) => {
        // A kept-alive connection the server had closed: the request never got there.
        const unsent = req.reusedSocket && /** @type {any} */ (e).code === 'ECONNRESET' && !req.res;
        reject(connectionError(e, unsent));
      });
      req.end(body);
    });
  }
}

/**
 * @param {any} e
 * @param {boolean} unsent
 */
function connectionError(e, unsent) {
  const code = e && e.code;
  const err = /** @type {any} */ (new ConnectionError((e && e.message) || String(code || e), { cause: e, code }));
  err.retryable = RETRYABLE_CODES.has(code);
  err.unsent = unsent;
  return err;
}

/** @param {TaskSpec} spec */
function withKey(spec) {
  if (spec.idempotency_key === undefined || spec.idempotency_key === null) {
    spec.idempotency_key = randomUUID();
  }
  return spec;
}

/** @param {Record<string, unknown>} params */
function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null) q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

module.exports = { Client, MAX_WAIT_MS, TERMINAL };
