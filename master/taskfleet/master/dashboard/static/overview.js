// The overview: queues with their counts, finished tasks over time, workers, masters.
"use strict";

const STATES = ["pending", "running", "succeeded", "failed", "cancelled"];

function countLink(queue, state, n) {
  const url = "/tasks?queue=" + encodeURIComponent(queue) + "&state=" + state;
  return tf.el("td", { class: "num" }, n ? tf.el("a", { href: url }, n) : "0");
}

// The age of a queue's oldest ready task; ticks between overviews (tickAges).
function oldestCell(since) {
  if (!since) return tf.el("td", { class: "num oldest" });
  const title = "waiting since " + tf.time(since);
  return tf.el("td", { class: "num oldest", "data-since": since, title: title }, tf.age(since));
}

function tickAges() {
  document.querySelectorAll("td[data-since]").forEach(function (cell) {
    cell.textContent = tf.age(Number(cell.dataset.since));
  });
}

function render(overview) {
  const queues = overview.queues.map(function (q) {
    return tf.el("tr", { "data-queue": q.queue },
      tf.el("td", {}, tf.el("a", { href: "/tasks?queue=" + encodeURIComponent(q.queue) }, q.queue)),
      ...STATES.map(function (s) { return countLink(q.queue, s, q[s]); }),
      oldestCell(q.oldest_pending_at));
  });
  tf.replaceRows(document.querySelector("#queues tbody"), queues);
  document.getElementById("no-queues").hidden = queues.length > 0;

  const workers = overview.workers.map(function (w) {
    return tf.el("tr", { "data-worker": w.worker_id },
      tf.el("td", {}, tf.el("code", {}, w.worker_id)), tf.el("td", {}, w.hostname),
      tf.el("td", { class: "num" }, w.pid), tf.el("td", {}, w.queues.join(", ")),
      tf.el("td", { class: "num" }, w.running + " / " + w.slots),
      tf.el("td", { title: tf.time(w.connected_at) }, tf.ago(w.connected_at)));
  });
  tf.replaceRows(document.querySelector("#workers tbody"), workers);
  document.getElementById("no-workers").hidden = workers.length > 0;

  const masters = overview.masters.map(function (m) {
    return tf.el("tr", {},
      tf.el("td", {}, tf.el("code", {}, m.master_id)), tf.el("td", {}, m.hostname),
      tf.el("td", { class: "num" }, m.pid), tf.el("td", {}, m.listen),
      tf.el("td", { title: tf.time(m.started_at) }, tf.ago(m.started_at)));
  });
  tf.replaceRows(document.querySelector("#masters tbody"), masters);
  document.getElementById("masters-section").hidden = masters.length < 2;

  renderChart(overview.throughput);
}

function renderChart(throughput) {
  const counts = throughput.finished;
  const peak = Math.max(1, ...counts);
  const chart = document.getElementById("throughput");
  const bars = counts.map(function (n, i) {
    const bar = tf.el("div", { class: "bar", title: n + " in " + throughput.bucket_s + " s" });
    bar.style.height = Math.round((100 * n) / peak) + "%";  // CSSOM: allowed by the CSP
    return bar;
  });
  chart.replaceChildren(...bars);
  const total = counts.reduce(function (a, b) { return a + b; }, 0);
  const minutes = Math.round((counts.length * throughput.bucket_s) / 60);
  document.getElementById("throughput-label").textContent =
    "(" + total + " in the last " + minutes + " min, " + throughput.bucket_s + " s per bar)";
}

tf.loadSession().then(function () {
  tf.api("/api/overview").then(render);
  tf.live(render);
  setInterval(tickAges, 1000);
});
