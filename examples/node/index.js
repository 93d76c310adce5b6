// Submit a few `square` tasks to a taskfleet master and print their results.
//
//   TASKFLEET_MASTER=127.0.0.1:50051 node index.js [N ...]
//
// The client is built at run time from the .proto files (no code generation),
// so it always matches protos/taskfleet/v1. Exit status: 0 when every task
// SUCCEEDED, 1 when one failed or did not finish in time, 2 on bad input.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.TASKFLEET_PROTOS || path.join(__dirname, '..', '..', 'protos');
const MASTER = process.env.TASKFLEET_MASTER || '127.0.0.1:50051';
const QUEUE = process.env.TASKFLEET_QUEUE || 'default';
const TOKEN = process.env.TASKFLEET_TOKEN || '';
const WAIT_S = Number(process.env.TASKFLEET_WAIT_S || 30);
const CALL_TIMEOUT_MS = 10_000;
const JSON_TYPE = 'application/json';

function loadTaskService() {
  const definition = protoLoader.loadSync('taskfleet/v1/tasks.proto', {
    includeDirs: [PROTOS],
    keepCase: true, // field names exactly as in the .proto (task_ids, not taskIds)
    longs: String,
    enums: String, // states as names, e.g. 'TASK_STATE_SUCCEEDED'
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).taskfleet.v1.TaskService;
}

function callMetadata() {
  const metadata = new grpc.Metadata();
  if (TOKEN) metadata.set('authorization', `Bearer ${TOKEN}`);
  return metadata;
}

function deadline() {
  return new Date(Date.now() + CALL_TIMEOUT_MS);
}

// A TaskSpec for name(...args) with taskfleet's default JSON payload.
function taskSpec(name, args) {
  return {
    name,
    queue: QUEUE,
    payload: Buffer.from(JSON.stringify({ args, kwargs: {} })),
    content_type: JSON_TYPE,
  };
}

function submit(client, specs) {
  return new Promise((resolve, reject) => {
    client.Submit({ tasks: specs }, callMetadata(), { deadline: deadline() }, (err, response) =>
      err ? reject(err) : resolve(response.task_ids),
    );
  });
}

// Resolves with the tasks that reached a final state, in the order they did.
function waitTasks(client, taskIds, timeoutS) {
  return new Promise((resolve, reject) => {
    const done = [];
    const request = { task_ids: taskIds, timeout: { seconds: timeoutS, nanos: 0 } };
    const stream = client.WaitTasks(request, callMetadata());
    stream.on('data', (task) => done.push(task));
    stream.on('error', reject);
    stream.on('end', () => resolve(done));
  });
}

function decodeResult(task) {
  const type = task.result_content_type || JSON_TYPE;
  return type === JSON_TYPE ? JSON.parse(task.result.toString('utf8')) : task.result;
}

async function main(argv) {
  const numbers = argv.length ? argv.map(Number) : [2, 3, 4];
  if (numbers.some((n) => !Number.isInteger(n))) {
    console.error(`usage: node index.js [INTEGER ...]; got ${argv.join(' ')}`);
    return 2;
  }
  const TaskService = loadTaskService();
  const client = new TaskService(MASTER, grpc.credentials.createInsecure());
  try {
    const taskIds = await submit(client, numbers.map((n) => taskSpec('square', [n])));
    const byId = new Map((await waitTasks(client, taskIds, WAIT_S)).map((t) => [t.id, t]));
    let status = 0;
    taskIds.forEach((id, i) => {
      const task = byId.get(id);
      if (!task) {
        console.error(`task ${id} (square(${numbers[i]})) not finished after ${WAIT_S} s`);
        status = 1;
      } else if (task.state === 'TASK_STATE_SUCCEEDED') {
        console.log(`square(${numbers[i]}) = ${JSON.stringify(decodeResult(task))}`);
      } else {
        const error = task.error || {};
        console.error(`task ${id} (square(${numbers[i]})) ${task.state}: ${error.type}: ${error.message}`);
        status = 1;
      }
    });
    return status;
  } catch (err) {
    console.error(`taskfleet master at ${MASTER}: ${err.message}`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((status) => {
  process.exitCode = status;
});
