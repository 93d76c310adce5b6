// Shared by every page: calls to the JSON API, the live feed, small helpers.
"use strict";

const tf = {};

// A call to the JSON API; throws Error(message) on a non-2xx answer.
tf.api = async function (path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (response.status === 401) {
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
    throw new Error("not signed in");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
};

tf.post = function (path, body) {
  return tf.api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
};

// An element with attributes and children (strings become text, never HTML).
tf.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
};

tf.time = function (unix) {
  if (!unix) return "";
  return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
};

tf.ago = function (unix) {
  if (!unix) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " days ago";
};

// How long since `unix`, to the second: "45 s", "3 m 12 s", "2 h 5 m", "3 d 4 h".
tf.age = function (unix) {
  if (!unix) return "";
  const s = Math.max(0, Math.floor(Date.now() / 1000 - unix));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
};

tf.replaceRows = function (tbody, rows) {
  tbody.replaceChildren(...rows);
};

tf.session = null;

// What this caller may do ({role: "act"|"view", login: bool}); hides what it may not.
tf.loadSession = async function () {
  tf.session = await tf.api("/api/session");
  for (const form of document.querySelectorAll("form.logout")) form.hidden = !tf.session.login;
  if (tf.session.role !== "act") {
    for (const node of document.querySelectorAll(".actions")) node.hidden = true;
  }
  return tf.session;
};

// Calls onOverview with each overview the server sends (about once a second at
// most, only when something changed). Closed while the tab is hidden, opened
// again when it shows: the server then sends the current overview at once.
tf.live = function (onOverview) {
  const badge = document.getElementById("live");
  let source = null;
  function open() {
    if (source) return;
    source = new EventSource("/api/events");
    source.onopen = function () { badge.textContent = "live"; badge.className = "live on"; };
    source.onmessage = function (event) { onOverview(JSON.parse(event.data)); };
    source.onerror = function () { badge.textContent = "reconnecting…"; badge.className = "live"; };
  }
  function close() {
    if (!source) return;
    source.close();
    source = null;
    badge.textContent = "paused";
    badge.className = "live";
  }
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) close(); else open();
  });
  if (!document.hidden) open();
};
