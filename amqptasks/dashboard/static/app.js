// amqptasks dashboard: fills the page shells from the JSON API and keeps them live through
// server-sent events (/api/live). Everything a task carries is inserted with textContent
// (never innerHTML), so task data can never become markup. No dependencies.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const main = document.getElementById("app");
const PAGE = main.dataset.page;
const ITEM = main.dataset.item;
const STATES = ["PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REJECTED",
  "REVOKED", "EXPIRED"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = CSRF;
    opts.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, opts);
  if (resp.status === 401) { window.location.assign("/login"); throw new Error("signed out"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", body: JSON.stringify(body || {}) });
}

function fmtTime(text) { return text ? text.replace("T", " ").replace("Z", "") : "–"; }
function fmtNum(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en"); }
function badge(state) { return el("span", { class: `state s-${String(state).toLowerCase()}` }, state); }
function taskLink(id, text) { return el("a", { href: `/task/${encodeURIComponent(id)}` }, text || id); }

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "nothing here"))]));
}

function notice(text, kind) {
  const box = document.getElementById("notice") || el("div", { id: "notice", role: "status" });
  box.className = `notice ${kind || ""}`;
  box.textContent = text;
  if (!box.isConnected) main.prepend(box);
}

function render(title, ...content) {
  main.replaceChildren(el("h1", {}, title), ...content.filter((c) => c !== null && c !== undefined));
}

// -- charts (hand-made SVG) ---------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function chart(title, labels, series) {
  // series: [{name, cls, values}] drawn as lines over the labels (x axis)
  const w = 640, h = 160, pad = 30;
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, class: "chart", role: "img" });
  const t = svg("title"); t.textContent = title; root.append(t);
  root.append(svg("line", { x1: pad, y1: h - pad, x2: w - 5, y2: h - pad, class: "axis" }));
  const top = svg("text", { x: 2, y: 12, class: "tick" }); top.textContent = fmtNum(max); root.append(top);
  const n = Math.max(1, labels.length - 1);
  for (const s of series) {
    const xy = s.values.map((v, i) => [pad + (i * (w - pad - 5)) / n, h - pad - (v / max) * (h - pad - 15)]);
    root.append(svg("polyline", { points: xy.map((p) => p.join(",")).join(" "), class: `line ${s.cls}` }));
    for (const [x, y] of xy) root.append(svg("circle", { cx: x, cy: y, r: 3, class: `dot ${s.cls}` }));
  }
  if (labels.length) {
    const a = svg("text", { x: pad, y: h - 8, class: "tick" }); a.textContent = labels[0]; root.append(a);
    const b = svg("text", { x: w - 80, y: h - 8, class: "tick" }); b.textContent = labels[labels.length - 1]; root.append(b);
  }
  const legend = el("p", { class: "legend" }, series.map((s) => el("span", { class: `key ${s.cls}` }, s.name)));
  return el("figure", {}, el("figcaption", {}, title), root, legend);
}

// An id shortened for a table: its tail, the random part (amqptasks' ids start with the
// millisecond they were made, so tasks sent together share their first characters).
function shortId(id) {
  return id.length > 13 ? `…${id.slice(-12)}` : id;
}

async function charts() {
  const data = await api("/api/charts");
  const labels = data.minutes.map((m) => m.minute.slice(11, 16));
  const get = (state) => data.minutes.map((m) => m.counts[state] || 0);
  const out = [chart("Tasks finished per minute (last hour)", labels, [
    { name: "succeeded", cls: "ok", values: get("SUCCESS") },
    { name: "failed", cls: "bad", values: get("FAILURE") },
    { name: "retried", cls: "warn", values: get("RETRY") },
  ])];
  const names = [...new Set(data.depth.flatMap((d) => Object.keys(d.queues)))].filter((q) => !q.startsWith("amqptasks."));
  if (names.length) {
    const classes = ["c1", "c2", "c3", "c4", "c5", "c6"];
    out.push(chart("Queue depth (sampled every 5 s)", data.depth.map((d) => d.time.slice(11, 19)),
      names.slice(0, 6).map((q, i) => ({ name: q, cls: classes[i], values: data.depth.map((d) => d.queues[q] || 0) }))));
  }
  return out;
}

// -- pages ---------------------------------------------------------------------------------
const pages = {};
let refreshTimer = null;
function soon(fn) { // re-read at most once a second while ticks arrive
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; fn(); }, 1000);
}

pages.overview = {
  async load() {
    const [stats, figures] = await Promise.all([api("/api/stats"), charts()]);
    const cards = [["tasks in history", fmtNum(stats.tasks)], ["workers online", fmtNum(stats.workers_online)],
      ["events ingested", fmtNum(stats.events)], ["ingest lag", `${stats.lag}s`],
      ["history file", `${(stats.file_bytes / 1e6).toFixed(1)} MB`]];
    render("Overview", el("div", { class: "cards" }, cards.map(([k, v]) => el("div", { class: "card" }, el("b", {}, v), el("span", {}, k)))),
      stats.ingest_error ? el("p", { class: "notice bad" }, `events: ${stats.ingest_error}`) : null,
      ...figures);
  },
  tick() { soon(() => this.load()); },
};

function workerActions(w) {
  const name = w.hostname;
  const act = async (label, path, body) => {
    try { const r = await post(path, body); notice(`${name}: ${r.message || "done"}`, "ok"); }
    catch (e) { notice(`${name}: ${label}: ${e.message}`, "bad"); }
  };
  const q = (cmd) => async () => {
    const queue = window.prompt(`Queue to ${cmd === "add-consumer" ? "consume" : "stop consuming"} on ${name}:`);
    if (queue) await act(cmd, `/api/worker/queue/${cmd}/${encodeURIComponent(name)}?queue=${encodeURIComponent(queue)}`);
  };
  return el("td", { class: "actions" },
    el("button", { onclick: () => act("grow", `/api/worker/pool/grow/${encodeURIComponent(name)}?n=1`) }, "pool +1"),
    el("button", { onclick: () => act("shrink", `/api/worker/pool/shrink/${encodeURIComponent(name)}?n=1`) }, "pool −1"),
    el("button", { onclick: q("add-consumer") }, "add consumer"),
    el("button", { onclick: q("cancel-consumer") }, "cancel consumer"),
    el("button", { class: "danger", onclick: () => { if (window.confirm(`Shut down ${name}? Running tasks finish first.`)) act("shutdown", `/api/worker/shutdown/${encodeURIComponent(name)}`); } }, "shut down"));
}

pages.workers = {
  async load() {
    const workers = Object.values(await api("/api/workers"));
    const rows = workers.map((w) => el("tr", { dataset: { worker: w.hostname } },
      el("td", {}, w.hostname), el("td", {}, badge(w.status === "online" ? "ONLINE" : "OFFLINE")),
      el("td", {}, `${w.heartbeat_age}s`), el("td", {}, w.pool), el("td", {}, w.concurrency),
      el("td", {}, w.active), el("td", {}, fmtNum(w.processed)), el("td", {}, (w.loadavg || []).join(" ")),
      el("td", {}, (w.queues || []).join(", ")), workerActions(w)));
    const old = document.getElementById("notice");
    render("Workers", old, el("p", { class: "muted" }, `${workers.filter((w) => w.status === "online").length} online`),
      table(["worker", "status", "heartbeat", "pool", "concurrency", "active", "processed", "load", "queues", ""], rows));
  },
  tick(t) { if (t.workers.length) soon(() => this.load()); },
};

const taskState = { cursor: null, history: [] };
function taskFilters() {
  const form = document.getElementById("filters");
  const params = new URLSearchParams();
  if (form) for (const [k, v] of new FormData(form).entries()) if (v) params.set(k, v);
  return params;
}

function submitForm() {
  const form = el("form", { id: "submit", class: "row" },
    el("input", { name: "name", placeholder: "task name", list: "task-types", required: true, "aria-label": "task name" }),
    el("input", { name: "args", placeholder: "args, JSON: [1, 2]", value: "[]", "aria-label": "args" }),
    el("input", { name: "kwargs", placeholder: "kwargs, JSON: {}", value: "{}", "aria-label": "kwargs" }),
    el("button", { type: "submit" }, "Submit task"), el("datalist", { id: "task-types" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    let args, kwargs;
    try { args = JSON.parse(data.get("args") || "[]"); kwargs = JSON.parse(data.get("kwargs") || "{}"); }
    catch (e) { notice(`args/kwargs: ${e.message}`, "bad"); return; }
    try {
      const r = await post(`/api/task/async-apply/${encodeURIComponent(data.get("name"))}`, { args, kwargs });
      const box = el("span", {}, "sent ", taskLink(r["task-id"]), " ");
      notice("", "ok"); document.getElementById("notice").replaceChildren(box);
      document.getElementById("notice").dataset.submitted = r["task-id"];
      pages.tasks.load();
    } catch (e) { notice(`not sent: ${e.message}`, "bad"); }
  });
  api("/api/task/types").then((r) => {
    form.querySelector("datalist").replaceChildren(...r["task-types"].map((n) => el("option", { value: n })));
  }).catch(() => {});
  return form;
}

pages.tasks = {
  built: false,
  build() {
    const filters = el("form", { id: "filters", class: "row" },
      el("input", { name: "search", placeholder: "id, or text in name/args", "aria-label": "search" }),
      el("select", { name: "state", "aria-label": "state" }, el("option", { value: "" }, "any state"), STATES.map((s) => el("option", { value: s }, s))),
      el("input", { name: "name", placeholder: "task name", "aria-label": "task name filter" }),
      el("input", { name: "worker", placeholder: "worker", "aria-label": "worker" }),
      el("input", { name: "queue", placeholder: "queue", "aria-label": "queue" }),
      el("input", { name: "since", placeholder: "since (ISO time)", "aria-label": "since" }),
      el("input", { name: "until", placeholder: "until (ISO time)", "aria-label": "until" }),
      el("button", { type: "submit" }, "Filter"));
    filters.addEventListener("submit", (ev) => { ev.preventDefault(); taskState.cursor = null; taskState.history = []; this.load(); });
    const pager = el("p", { class: "row" },
      el("button", { id: "newer", onclick: () => { taskState.cursor = taskState.history.pop() || null; this.load(); } }, "← newer"),
      el("button", { id: "older", onclick: () => { if (taskState.next) { taskState.history.push(taskState.cursor); taskState.cursor = taskState.next; this.load(); } } }, "older →"),
      el("span", { id: "count", class: "muted" }));
    render("Tasks", submitForm(), filters, el("div", { id: "list" }), pager);
    this.built = true;
  },
  async load() {
    if (!this.built) this.build();
    const params = taskFilters();
    if (taskState.cursor) params.set("before", taskState.cursor);
    let page;
    try { page = await api(`/api/task-list?${params}`); }
    catch (e) { notice(e.message, "bad"); return; }
    taskState.next = page.next;
    const rows = page.tasks.map((t) => el("tr", { dataset: { id: t.id, state: t.state } },
      el("td", {}, taskLink(t.id, shortId(t.id))), el("td", {}, t.name), el("td", {}, badge(t.state)),
      el("td", { class: "code" }, t.args), el("td", { class: "code" }, t.kwargs),
      el("td", { class: "code" }, t.state === "SUCCESS" ? t.result : (t.exception ? `${t.exception.type}: ${t.exception.message}` : "")),
      el("td", {}, t.worker), el("td", {}, t.queue), el("td", {}, fmtTime(t.ts)),
      el("td", {}, t.runtime === null ? "–" : `${Number(t.runtime).toFixed(4)}s`)));
    document.getElementById("list").replaceChildren(table(["id", "task", "state", "args", "kwargs", "result", "worker", "queue", "first seen", "runtime"], rows));
    document.getElementById("count").textContent = `${fmtNum(page.total)}${page.capped ? "+" : ""} task(s)`;
  },
  tick() { if (!taskState.cursor) soon(() => this.load()); },
};

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

pages.task = {
  state: null,
  async load() {
    let t;
    try { t = await api(`/api/task/info/${encodeURIComponent(ITEM)}`); }
    catch (e) { render("Task", el("p", { class: "notice bad" }, e.message)); return; }
    this.state = t.state;
    const links = (items) => items.length ? el("ul", {}, items.map((c) => el("li", {}, taskLink(c.id), " ", c.name, " ", badge(c.state)))) : "–";
    const timeline = t.timeline.map((e) => el("tr", {}, el("td", {}, fmtTime(e.time)), el("td", {}, e.type), el("td", {}, e.hostname),
      el("td", { class: "code" }, [e.exception ? `${e.exception.type}: ${e.exception.message}` : "", e.countdown ? ` retry in ${e.countdown}s` : "", e.reason ? ` reason ${e.reason}` : "", e.runtime !== undefined ? ` ${e.runtime}s` : ""].join(""))));
    render(`Task ${t.name || ""}`,
      el("p", {}, badge(t.state), " ", el("code", { id: "task-id" }, t.id)),
      kv([["task", t.name], ["worker", t.worker], ["queue", t.queue], ["retries", t.retries], ["runtime", t.runtime === null ? null : `${t.runtime}s`],
        ["sent", fmtTime(t.sent)], ["received", fmtTime(t.received)], ["started", fmtTime(t.started)], ["finished", fmtTime(t.finished)],
        ["eta", t.eta], ["expires", t.expires], ["reason", t.reason], ["detail", t.detail]]),
      el("h2", {}, "Call"), kv([["args", el("pre", { id: "args" }, t.args)], ["kwargs", el("pre", { id: "kwargs" }, t.kwargs)]]),
      el("h2", {}, "Outcome"),
      t.state === "SUCCESS" ? el("pre", { id: "result" }, t.result) : null,
      t.exception ? el("p", { class: "bad" }, `${t.exception.type}: ${t.exception.message}`) : null,
      t.traceback ? el("pre", { class: "traceback" }, t.traceback) : null,
      el("h2", {}, "Workflow"),
      kv([["parent", t.parent_id ? taskLink(t.parent_id) : null], ["root", t.root_id && t.root_id !== t.id ? taskLink(t.root_id) : null],
        ["children", links(t.children)], ["group", t.group_id ? links(t.group_members) : null], ["chord", t.chord_id ? links(t.chord_members) : null]]),
      el("h2", {}, "Timeline"), table(["time", "event", "worker", ""], timeline));
  },
  tick(t) { if (t.overflow || ITEM in t.tasks) soon(() => this.load()); },
};

pages.queues = {
  async load() {
    let data;
    try { data = await api("/api/queues"); } catch (e) { render("Queues", el("p", { class: "notice bad" }, e.message)); return; }
    const rows = data.queues.map((q) => el("tr", {}, el("td", {}, q.name), el("td", {}, q.type), el("td", {}, fmtNum(q.messages)),
      el("td", {}, fmtNum(q.ready)), el("td", {}, fmtNum(q.unacked)), el("td", {}, q.consumers),
      el("td", {}, Number(q.publish_rate).toFixed(1)), el("td", {}, Number(q.deliver_rate).toFixed(1))));
    render("Queues", table(["queue", "type", "messages", "ready", "unacked", "consumers", "publish/s", "deliver/s"], rows), ...(await charts()).slice(1));
  },
  tick() { soon(() => this.load()); },
};

pages.dlq = {
  queue: null,
  async load() {
    const list = await api("/api/dlq");
    if (!this.queue) this.queue = (list.queues.find((q) => q.messages) || list.queues[0] || {}).name;
    const picker = el("p", { class: "row" }, list.queues.map((q) => el("button", {
      class: q.name === this.queue ? "current" : "", onclick: () => { this.queue = q.name; this.load(); },
    }, `${q.name} (${q.messages === null ? "?" : q.messages})`)));
    if (!this.queue) { render("Dead letters", picker); return; }
    const data = await api(`/api/dlq/${encodeURIComponent(this.queue)}`);
    const replay = async (body) => {
      try {
        const r = await post(`/api/dlq/${encodeURIComponent(this.queue)}/replay`, body);
        notice(`replayed ${r.replayed}` + (r.problems.length ? `; ${r.problems.join("; ")}` : "") +
          (Object.keys(r.skipped).length ? `; skipped ${JSON.stringify(r.skipped)}` : ""), r.problems.length ? "bad" : "ok");
      } catch (e) { notice(e.message, "bad"); }
      this.load();
    };
    const rows = data.letters.map((d) => el("tr", { dataset: { id: d.id } },
      el("td", {}, el("input", { type: "checkbox", value: d.id, "aria-label": `select ${d.id}` })),
      el("td", {}, d.id), el("td", {}, d.task), el("td", {}, d.reason), el("td", {}, d.attempts),
      el("td", { class: "code" }, d.exception || d.detail), el("td", {}, fmtTime(d.last_failed_at)),
      el("td", {}, `${d.original_exchange || "(default)"} / ${d.original_routing_key}`),
      el("td", {}, el("button", { class: "replay-one", onclick: () => replay({ ids: [d.id] }) }, "replay"))));
    const selected = () => [...main.querySelectorAll("tbody input:checked")].map((c) => c.value);
    const old = document.getElementById("notice");
    render("Dead letters", old, picker,
      el("p", { class: "row" },
        el("button", { onclick: () => { const ids = selected(); if (ids.length) replay({ ids }); } }, "replay selected"),
        el("button", { onclick: () => { if (window.confirm(`Replay every dead letter of ${this.queue}?`)) replay({ all: true }); } }, "replay all"),
        el("button", { class: "danger", onclick: async () => {
          if (!window.confirm(`Delete every message in ${this.queue}? This cannot be undone.`)) return;
          try { const r = await post(`/api/dlq/${encodeURIComponent(this.queue)}/purge`, { confirm: this.queue }); notice(`purged ${r.purged}`, "ok"); }
          catch (e) { notice(e.message, "bad"); }
          this.load();
        } }, "purge")),
      table(["", "id", "task", "reason", "attempts", "exception", "last failure", "route", ""], rows));
  },
  tick() {},
};

pages.schedules = {
  async load() {
    const data = await api("/api/schedules");
    const rows = data.schedules.map((s) => el("tr", {}, el("td", {}, s.name), el("td", {}, s.task), el("td", {}, s.timing),
      el("td", {}, s.timezone), el("td", {}, s.next.map(fmtTime).join(", "))));
    render("Schedules", el("p", { class: "muted" }, `from ${data.source}`), table(["schedule", "task", "timing", "zone", "next fire times (UTC)"], rows));
  },
  tick() {},
};

pages.broker = {
  async load() {
    let o;
    try { o = await api("/api/broker"); } catch (e) { render("Broker", el("p", { class: "notice bad" }, e.message)); return; }
    render("Broker", kv(Object.entries(o).map(([k, v]) => [k.replaceAll("_", " "), typeof v === "number" ? fmtNum(Math.round(v * 10) / 10) : v])));
  },
  tick() { soon(() => this.load()); },
};

async function hint() {
  try {
    const s = await api("/api/stats");
    document.getElementById("events-hint").hidden = !s.events_hint;
  } catch (e) { /* the page says what failed */ }
}

function live() {
  const source = new EventSource("/api/live");
  source.addEventListener("tick", (ev) => {
    const data = JSON.parse(ev.data);
    document.getElementById("events-hint").hidden = true;
    document.body.dataset.ticks = String(Number(document.body.dataset.ticks || 0) + 1);
    const page = pages[PAGE];
    if (page && page.tick) page.tick(data);
  });
}

(async function start() {
  const page = pages[PAGE];
  if (page) {
    try { await page.load(); } catch (e) { notice(e.message, "bad"); }
  }
  hint();
  setInterval(hint, 10000);
  live();
})();
