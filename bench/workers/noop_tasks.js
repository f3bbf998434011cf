// The no-op handler `hive-bench pool --lang node` runs (sdk/node).
'use strict';

module.exports = {
  'bench.noop': (payload) => payload,
};
