// Tasks: filters in the address bar, keyset pages, bulk actions after showing the count.
"use strict";

let cursors = [""];  // the cursor of each page shown so far; the last is the current page
let nextCursor = null;

function filter() {
  const params = new URLSearchParams(location.search);
  return { queue: params.get("queue") || "", name: params.get("name") || "", states: params.getAll("state") };
}

function query(f, cursor) {
  const params = new URLSearchParams();
  if (f.queue) params.set("queue", f.queue);
  if (f.name) params.set("name", f.name);
  for (const s of f.states) params.append("state", s);
  if (cursor) params.set("cursor", cursor);
  return params.toString();
}

function fillForm(f) {
  document.getElementById("f-queue").value = f.queue;
  document.getElementById("f-name").value = f.name;
  for (const box of document.querySelectorAll("input[name=state]")) box.checked = f.states.includes(box.value);
}

async function load() {
  const page = await tf.api("/api/tasks?" + query(filter(), cursors[cursors.length - 1]));
  const rows = page.tasks.map(function (t) {
    return tf.el("tr", { "data-task": t.id, "data-state": t.state },
      tf.el("td", {}, tf.el("a", { href: "/tasks/" + encodeURIComponent(t.id) }, tf.el("code", {}, t.id))),
      tf.el("td", {}, t.name), tf.el("td", {}, t.queue),
      tf.el("td", {}, tf.el("span", { class: "state " + t.state }, t.state)),
      tf.el("td", { class: "num" }, t.attempts),
      tf.el("td", { title: tf.time(t.created_at) }, tf.ago(t.created_at)),
      tf.el("td", { title: tf.time(t.finished_at) }, tf.ago(t.finished_at)),
      tf.el("td", {}, t.error_type || ""));
  });
  tf.replaceRows(document.querySelector("#tasks tbody"), rows);
  document.getElementById("no-tasks").hidden = rows.length > 0;
  nextCursor = page.next_cursor;
  document.getElementById("next").disabled = !nextCursor;
  document.getElementById("first").disabled = cursors.length === 1;
}

function say(text) { document.getElementById("message").textContent = text; }

// Shows how many tasks the filter matches, asks, then acts on exactly that filter.
async function bulk(action, states, verb) {
  const f = filter();
  const target = { queue: f.queue, name: f.name, states: states };
  const { count } = await tf.api("/api/count?" + query(target, ""));
  const where = (f.queue ? " in queue " + f.queue : " in every queue") + (f.name ? " named " + f.name : "");
  if (count === 0) { say("No " + states.join("/") + " tasks" + where + "."); return; }
  if (!confirm(verb + " " + count + " " + states.join("/") + " tasks" + where + "?")) return;
  const done = await tf.post("/api/" + action, target);
  say(verb + ": " + done.count + " tasks.");
  await load();
}

document.getElementById("filter").addEventListener("submit", function (event) {
  event.preventDefault();
  const f = {
    queue: document.getElementById("f-queue").value.trim(),
    name: document.getElementById("f-name").value.trim(),
    states: [...document.querySelectorAll("input[name=state]:checked")].map(function (b) { return b.value; }),
  };
  history.replaceState(null, "", "/tasks?" + query(f, ""));
  cursors = [""];
  load().catch(function (e) { say(e.message); });
});
document.getElementById("next").addEventListener("click", function () {
  cursors.push(nextCursor);
  load().catch(function (e) { say(e.message); });
});
document.getElementById("first").addEventListener("click", function () {
  cursors = [""];
  load().catch(function (e) { say(e.message); });
});
document.getElementById("retry-all").addEventListener("click", function () {
  bulk("retry-all", ["failed"], "Retry").catch(function (e) { say(e.message); });
});
document.getElementById("purge").addEventListener("click", function () {
  const chosen = filter().states.filter(function (s) { return ["succeeded", "failed", "cancelled"].includes(s); });
  bulk("purge", chosen.length ? chosen : ["succeeded", "failed", "cancelled"], "Purge").catch(function (e) { say(e.message); });
});

fillForm(filter());
tf.loadSession().then(function () {
  load().catch(function (e) { say(e.message); });
  // Live: the newest page follows new tasks and state changes; older pages stay put.
  tf.live(function () { if (cursors.length === 1) load().catch(function (e) { say(e.message); }); });
});
