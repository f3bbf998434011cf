'use strict';
/**
 * The Hive's Node.js SDK: a client of the queen's HTTP API, and the worker side of the
 * drone's worker pools (docs/POOLS.md).
 *
 *   const { Client, task, PermanentError } = require('the-hive');
 */

const { Client } = require('./lib/client');
const {
  HiveError,
  ApiError,
  ConnectionError,
  WaitTimeoutError,
  PermanentError,
  isPermanent,
} = require('./lib/errors');
const { task, registry } = require('./lib/registry');
const { Context, serve, SDK } = require('./lib/worker');

module.exports = {
  Client,
  task,
  registry,
  serve,
  Context,
  HiveError,
  ApiError,
  ConnectionError,
  WaitTimeoutError,
  PermanentError,
  isPermanent,
  version: SDK.slice('hive-node/'.length),
};
