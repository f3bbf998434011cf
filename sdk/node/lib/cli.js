'use strict';
/** `hive-worker worker MODULE...`: load task modules, then serve the drone's channel. */

const path = require('node:path');
const { pathToFileURL } = require('node:url');
const { registry, registerExports } = require('./registry');
const { serve, openChannel, SDK, describeError } = require('./worker');

const USAGE = `usage: hive-worker worker MODULE [MODULE...]

Loads each MODULE (a path relative to the current directory; .mjs files and ES modules
are imported) and serves the tasks they define to the drone that started this process:
it must be the command of a [[pool]] in the drone's config (docs/POOLS.md).

A module defines tasks with the SDK's task(kind, handler), or by exporting them:
  module.exports = { 'node.greet': (payload, ctx) => ... };
`;

/** A failure to report on stderr, with the exit status to end with. */
class CliError extends Error {
  /**
   * @param {string} message
   * @param {number} [status]
   */
  constructor(message, status = 1) {
    super(message);
    this.status = status;
  }
}

/**
 * The error and the stack frames of user code: without Node's module loader and this
 * SDK, so the message stays within the stderr tail the drone reports.
 * @param {unknown} err
 */
function userStack(err) {
  const head = describeError(err);
  const stack = err instanceof Error && typeof err.stack === 'string' ? err.stack.split('\n') : [];
  const frames = stack
    .filter((line) => /^\s+at /.test(line))
    .filter((line) => !line.includes('node:') && !line.includes(__dirname))
    .slice(0, 8);
  return [head, ...frames].join('\n');
}

/**
 * Loads one module and registers its tasks: those it registers itself with `task()`, or,
 * if it registers none, the functions it exports.
 * @param {string} spec the module's path as given
 * @param {string} cwd
 * @returns {Promise<number>} how many kinds it added
 */
async function loadModule(spec, cwd) {
  const file = path.resolve(cwd, spec);
  const reg = registry();
  const before = reg.size;
  let exports;
  try {
    if (file.endsWith('.mjs')) {
      exports = await import(pathToFileURL(file).href);
    } else {
      try {
        exports = require(file);
      } catch (e) {
        if (/** @type {any} */ (e).code !== 'ERR_REQUIRE_ESM') throw e;
        exports = await import(pathToFileURL(file).href);
      }
    }
  } catch (e) {
    const err = /** @type {any} */ (e);
    if (err && err.code === 'MODULE_NOT_FOUND' && String(err.message).includes(file)) {
      throw new CliError(`cannot find task module ${spec} (${file})`);
    }
    if (err && err.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes(file)) {
      throw new CliError(`cannot find task module ${spec} (${file})`);
    }
    throw new CliError(`loading task module ${spec} failed: ${userStack(err)}`);
  }
  if (reg.size > before) return reg.size - before;
  try {
    return registerExports(exports, spec);
  } catch (e) {
    throw new CliError(describeError(e));
  }
}

/**
 * @param {string[]} argv the arguments after the program name
 * @param {{cwd?: string, env?: NodeJS.ProcessEnv}} [options]
 */
async function main(argv, options = {}) {
  const cwd = options.cwd || process.cwd();
  const env = options.env || process.env;
  const [command, ...modules] = argv;
  if (command === '-h' || command === '--help' || command === 'help') {
    process.stdout.write(USAGE);
    return;
  }
  if (command === '-V' || command === '--version') {
    process.stdout.write(`${SDK}\n`);
    return;
  }
  if (command !== 'worker') {
    throw new CliError(command === undefined ? `missing command\n\n${USAGE}` : `unknown command ${JSON.stringify(command)}\n\n${USAGE}`, 2);
  }
  if (modules.length === 0) throw new CliError(`give at least one task module\n\n${USAGE}`, 2);
  // The channel first: run by hand, the command says so before running any module code.
  let socket;
  try {
    socket = openChannel(env.HIVE_POOL_FD);
  } catch (e) {
    throw new CliError(/** @type {Error} */ (e).message, 2);
  }
  for (const spec of modules) {
    const added = await loadModule(spec, cwd);
    if (added === 0) {
      throw new CliError(
        `task module ${spec} defines no tasks: register them with task(kind, handler) from ` +
          `'the-hive', or export them (module.exports = { 'kind.name': handler })`,
      );
    }
  }
  serve(registry(), { socket });
}

/** Runs `main` as the process's entry point. */
function run() {
  main(process.argv.slice(2)).catch((e) => {
    const status = e instanceof CliError ? e.status : 1;
    process.stderr.write(`hive-worker: ${e instanceof CliError ? e.message : (e && e.stack) || e}\n`);
    process.exitCode = status;
    // A module may have left timers or sockets open; nothing will be served.
    setImmediate(() => process.exit(status));
  });
}

module.exports = { main, run, loadModule, CliError, USAGE };
