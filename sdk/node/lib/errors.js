'use strict';

/** Base class of every error this SDK throws. */
class HiveError extends Error {
  /**
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The API answered with a 4xx or 5xx status; `message` is its `{"error": "..."}`. */
class ApiError extends HiveError {
  /**
   * @param {number} status
   * @param {string} message
   * @param {{method?: string, path?: string, body?: unknown}} [info]
   */
  constructor(status, message, info = {}) {
    super(message);
    /** The HTTP status. */
    this.status = status;
    /** The request's method and path, for logs. */
    this.method = info.method;
    this.path = info.path;
    /** The parsed response body (or its text if it was not JSON). */
    this.body = info.body;
  }
}

/** The queen could not be reached (refused, reset, timed out), after every retry. */
class ConnectionError extends HiveError {
  /**
   * @param {string} message
   * @param {{cause?: unknown, attempts?: number, code?: string}} [info]
   */
  constructor(message, info = {}) {
    super(message, { cause: info.cause });
    /** How many times the request was tried. */
    this.attempts = info.attempts;
    /** The system error code of the last failure (ECONNREFUSED, ...), or 'ETIMEDOUT'. */
    this.code = info.code;
  }
}

/** `Client.wait` ran out of time before the task ended; `task` is its last known record. */
class WaitTimeoutError extends HiveError {
  /**
   * @param {string} taskId
   * @param {number} timeoutMs
   * @param {object | undefined} task
   */
  constructor(taskId, timeoutMs, task) {
    super(`task ${taskId} did not end within ${timeoutMs} ms (it is ${task ? task.state : 'unknown'})`);
    this.taskId = taskId;
    this.timeoutMs = timeoutMs;
    this.task = task;
  }
}

/** Marks an error as permanent across copies of this SDK (see `isPermanent`). */
const PERMANENT = Symbol.for('the-hive.permanent');

/**
 * Throw it from a handler when retrying cannot help: the task fails at once, without the
 * attempts it has left.
 */
class PermanentError extends HiveError {
  /**
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(message, options) {
    super(message, options);
    this.retryable = false;
  }

  get [PERMANENT]() {
    return true;
  }
}

/**
 * Whether a thrown value asks not to be retried: a `PermanentError` of any copy of the SDK,
 * or any object with `retryable === false`.
 * @param {unknown} err
 */
function isPermanent(err) {
  return (
    err !== null &&
    typeof err === 'object' &&
    (/** @type {any} */ (err)[PERMANENT] === true || /** @type {any} */ (err).retryable === false)
  );
}

module.exports = {
  HiveError,
  ApiError,
  ConnectionError,
  WaitTimeoutError,
  PermanentError,
  isPermanent,
};
