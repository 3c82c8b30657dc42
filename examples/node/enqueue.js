// Enqueue one kie-extend job from Node.js with celery-node (Celery protocol 2, JSON, kwargs only).
//
//   npm install
//   KIE_BROKER_URL=redis://localhost:6379/0 node enqueue.js https://example.org/song.mp3 [JOB_ID]
//
// Environment: KIE_BROKER_URL (else KIE_REDIS_URL, else redis://localhost:6379/0) and KIE_QUEUE
// (default kie_extend). Prints the job id, which is the Celery task id chosen here.
"use strict";

const crypto = require("crypto");
const celery = require("celery-node");

const TASK_NAME = "kie_extend.extend";

async function main() {
  const [uploadUrl, jobIdArg] = process.argv.slice(2);
  if (!uploadUrl) {
    console.error("usage: node enqueue.js UPLOAD_URL [JOB_ID]");
    return 2;
  }
  const broker = process.env.KIE_BROKER_URL || process.env.KIE_REDIS_URL || "redis://localhost:6379/0";
  const queue = process.env.KIE_QUEUE || "kie_extend";
  const jobId = jobIdArg || crypto.randomUUID();

  // The KIE request body in KIE's own camelCase names; callBackUrl is filled in by the worker.
  const request = {
    uploadUrl,
    defaultParamFlag: true,
    instrumental: false,
    continueAt: 10,
    model: "V5",
    prompt: "[Verse]\nThe road runs on past the river",
    style: "indie folk",
    title: "Road (Extended)",
  };
  const kwargs = { request, metadata: { producer: "node" } };

  // celery-node also opens a result backend; results are not used, so point it at the broker.
  const client = celery.createClient(broker, broker, queue);
  try {
    await client.isReady();
    // client.sendTask(TASK_NAME, [], kwargs, jobId) would do, but it does not return the publish
    // promise, so a process that exits right after could lose the message. Publish and await it.
    const message = client.createTaskMessage(jobId, TASK_NAME, [], kwargs);
    await client.broker.publish(message.body, "", queue, message.headers, message.properties);
  } finally {
    await client.disconnect();
  }
  console.error(`sent ${TASK_NAME} to queue ${queue}`);
  console.log(jobId);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`error: ${err && err.message ? err.message : err}`);
    process.exit(1);
  },
);
