// One task: its spec, arguments, attempts, worker, times, result and error.
"use strict";

const taskId = decodeURIComponent(location.pathname.slice("/tasks/".length));
let shown = null;

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

function field(name, value) {
  if (value === null || value === undefined || value === "") return [];
  return [tf.el("dt", {}, name), tf.el("dd", {}, value)];
}

// As the task last set it (kept once it is final); nothing if it never did.
function progress(t) {
  if (!t.progress && !t.progress_message) return "";
  const percent = Math.round(t.progress * 100) + "%";
  return t.progress_message ? percent + " \u2014 " + t.progress_message : percent;
}

function render(t) {
  shown = t;
  document.getElementById("task-id").textContent = t.id;
  const state = document.getElementById("state");
  state.textContent = t.state;
  state.className = "state " + t.state;
  const worker = t.worker_id ? tf.el("code", {}, t.worker_id) : "";
  document.getElementById("fields").replaceChildren(
    ...field("Name", t.name), ...field("Queue", t.queue),
    ...field("Attempts", t.attempts + (t.max_attempts ? " of " + t.max_attempts : "")),
    ...field("Progress", progress(t)),
    ...field("Lost leases", t.lost_leases || ""), ...field("Worker", worker),
    ...field("Priority", t.priority || ""), ...field("Time limit", t.timeout_s ? t.timeout_s + " s" : ""),
    ...field("Not before", tf.time(t.not_before)), ...field("Idempotency key", t.idempotency_key),
    ...field("Metadata", Object.keys(t.metadata).length ? JSON.stringify(t.metadata) : ""),
    ...field("Created", tf.time(t.created_at)), ...field("Started", tf.time(t.started_at)),
    ...field("Finished", tf.time(t.finished_at)), ...field("Deleted after", tf.time(t.expires_at)));
  document.getElementById("payload").textContent =
    t.payload !== null ? pretty(t.payload) : "(" + t.content_type + ", base64) " + t.payload_base64;
  const hasResult = t.state === "succeeded";
  document.getElementById("result-section").hidden = !hasResult;
  if (hasResult) {
    document.getElementById("result").textContent =
      t.result !== null ? pretty(t.result) : "(base64) " + t.result_base64;
  }
  document.getElementById("error-section").hidden = !t.error;
  if (t.error) {
    document.getElementById("error-type").textContent = t.error.type;
    document.getElementById("error-message").textContent = t.error.message;
    document.getElementById("traceback").textContent = t.error.traceback;
  }
  document.getElementById("cancel").hidden = !["pending", "running"].includes(t.state);
  document.getElementById("retry").hidden = !["failed", "cancelled"].includes(t.state);
}

function say(text) { document.getElementById("message").textContent = text; }

async function load() { render(await tf.api("/api/tasks/" + encodeURIComponent(taskId))); }

async function act(action, question) {
  if (!confirm(question)) return;
  render(await tf.post("/api/tasks/" + encodeURIComponent(taskId) + "/" + action));
  say("");
}

document.getElementById("cancel").addEventListener("click", function () {
  act("cancel", "Cancel task " + taskId + "?").catch(function (e) { say(e.message); });
});
document.getElementById("retry").addEventListener("click", function () {
  act("retry", "Run task " + taskId + " again?").catch(function (e) { say(e.message); });
});

tf.loadSession().then(function () {
  load().catch(function (e) { say(e.message); });
  tf.live(function () { load().catch(function (e) { say(e.message); }); });
});
