'use strict';
/**
 * The handlers this process runs, by kind. The map lives on `globalThis` under a
 * `Symbol.for` key, so every copy of the SDK loaded in one process (a tasks module that
 * depends on its own copy, a CommonJS and an ESM one) registers into the same place.
 */

const REGISTRY = Symbol.for('the-hive.registry');

/** Names: 1-128 characters of `A-Z a-z 0-9 - _ . : /` (docs/API.md). */
const NAME = /^[A-Za-z0-9\-_.:/]{1,128}$/;

/** Kinds the drone runs itself; a pool may not announce them (docs/POOLS.md). */
const BUILTIN_KINDS = new Set(['echo', 'exec']);

/**
 * @typedef {import('./worker').Context} Context
 * @typedef {(payload: any, ctx: Context) => any} Handler
 */

/** @returns {Map<string, Handler>} */
function registry() {
  const g = /** @type {any} */ (globalThis);
  let map = g[REGISTRY];
  if (!(map instanceof Map)) {
    map = new Map();
    Object.defineProperty(g, REGISTRY, { value: map, configurable: true, writable: true });
  }
  return map;
}

/**
 * Why `kind` cannot be a pool's kind, or null if it can.
 * @param {unknown} kind
 * @returns {string | null}
 */
function kindProblem(kind) {
  if (typeof kind !== 'string') return `a kind must be a string, got ${typeof kind}`;
  if (!NAME.test(kind)) {
    return `invalid kind ${JSON.stringify(kind)}: 1-128 characters of A-Z a-z 0-9 - _ . : /`;
  }
  if (BUILTIN_KINDS.has(kind)) return `kind ${JSON.stringify(kind)} is built into the drone`;
  return null;
}

/**
 * Registers `handler` for tasks of `kind`. A handler is `(payload, ctx) => result`, plain
 * or async; what it returns (or resolves to) becomes the task's result.
 * @template {Handler} H
 * @param {string} kind
 * @param {H} handler
 * @returns {H} the handler, unchanged
 */
function task(kind, handler) {
  const problem = kindProblem(kind);
  if (problem) throw new TypeError(problem);
  if (typeof handler !== 'function') {
    throw new TypeError(`the handler of kind ${JSON.stringify(kind)} must be a function`);
  }
  const map = registry();
  const had = map.get(kind);
  if (had && had !== handler) {
    throw new Error(`kind ${JSON.stringify(kind)} already has a handler`);
  }
  map.set(kind, handler);
  return handler;
}

/**
 * Registers every function among a module's exports under its key: `module.exports =
 * { 'node.greet': greet }`. For an ES module's namespace, a `default` export that is a
 * plain object is read the same way.
 * @param {unknown} exports
 * @param {string} from where they came from, for error messages
 * @returns {number} how many kinds were registered
 */
function registerExports(exports, from) {
  if (exports === null || (typeof exports !== 'object' && typeof exports !== 'function')) {
    return 0;
  }
  let n = 0;
  const obj = /** @type {Record<string, unknown>} */ (exports);
  for (const key of Object.keys(obj)) {
    const value = obj[key];
    if (key === 'default' && value !== null && typeof value === 'object') {
      n += registerExports(value, from);
      continue;
    }
    if (typeof value !== 'function' || key === 'default' || key === '__esModule') continue;
    const problem = kindProblem(key);
    if (problem) throw new TypeError(`${from}: exported ${problem}`);
    task(key, /** @type {Handler} */ (value));
    n++;
  }
  return n;
}

module.exports = { registry, task, registerExports, kindProblem, BUILTIN_KINDS, REGISTRY };
