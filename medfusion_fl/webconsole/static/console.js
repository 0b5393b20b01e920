// MedFusion-FL console pages: plain DOM and SVG, no library, nothing loaded from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name (an identifier; nothing is fetched)
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

async function api(path, options = {}) {
  const response = await fetch(path, {credentials: "same-origin", ...options});
  if (response.status === 401 && document.body.dataset.page !== "login") {
    location.href = "/login?next=" + encodeURIComponent(location.pathname);
    throw new Error("not logged in");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "n/a" : text;
  if (cls) td.className = cls;
  return td;
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "n/a"; }

async function showUser() {
  const me = await api("/api/me");
  document.getElementById("who").textContent = me.name + " (" + me.role + ")";
  return me;
}

function loginPage() {
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("error");
    error.textContent = "";
    try {
      await api("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({name: document.getElementById("name").value,
                              password: document.getElementById("password").value})});
      const next = new URLSearchParams(location.search).get("next");
      location.href = next && next.startsWith("/") && !next.startsWith("//") ? next : "/";
    } catch (e) { error.textContent = e.message; }
  });
}

async function runsPage() {
  await showUser();
  const body = document.querySelector("#runs tbody");
  for (const run of await api("/api/runs")) {
    const row = body.insertRow();
    const link = document.createElement("a");
    link.href = "/runs/" + encodeURIComponent(run.id);
    link.textContent = run.name;
    row.insertCell().appendChild(link);
    cell(row, run.status, run.status);
    cell(row, run.rounds);
    cell(row, run.last_round);
    cell(row, run.has_model ? "model.onnx" : "");
    cell(row, run.problems.join("; "));
  }
}

// One line chart: series = {label: [[x, y], ...]}; a dashed horizontal line per value of `marks`.
function chart(title, series, marks = []) {
  const w = 360, h = 210, left = 42, bottom = 24, top = 8, right = 10;
  const points = Object.values(series).flat().filter(p => typeof p[1] === "number");
  const box = document.createElement("div");
  box.className = "chart";
  const heading = document.createElement("h3");
  heading.textContent = title;
  box.appendChild(heading);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  box.appendChild(svg);
  if (!points.length) { heading.textContent += " (nothing released yet)"; return box; }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]).concat(marks);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = x => left + (x - x0) / (x1 - x0) * (w - left - right);
  const Y = y => top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom);
  const add = (name, attrs) => {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    svg.appendChild(el);
    return el;
  };
  add("line", {x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, stroke: "#888"});
  add("line", {x1: left, y1: top, x2: left, y2: h - bottom, stroke: "#888"});
  for (const v of [y0, (y0 + y1) / 2, y1]) add("text", {x: 2, y: Y(v) + 4, "font-size": 10}).textContent = v.toFixed(2);
  for (const x of [...new Set(xs)]) add("text", {x: X(x) - 3, y: h - 8, "font-size": 10}).textContent = x;
  for (const m of marks) add("line", {x1: left, y1: Y(m), x2: w - right, y2: Y(m), stroke: "#999",
                                      "stroke-dasharray": "4 3"});
  const legend = document.createElement("div");
  legend.className = "legend";
  Object.entries(series).forEach(([label, pts], i) => {
    const colour = COLOURS[i % COLOURS.length];
    const shown = pts.filter(p => typeof p[1] === "number");
    if (!shown.length) return;
    add("polyline", {points: shown.map(p => X(p[0]) + "," + Y(p[1])).join(" "), fill: "none", stroke: colour,
                     "stroke-width": 2});
    for (const p of shown) add("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: colour});
    const key = document.createElement("span");
    key.style.color = colour;
    key.textContent = "\u25cf " + label;
    legend.appendChild(key);
  });
  box.appendChild(legend);
  return box;
}

function drawRun(lines) {
  const done = lines.filter(l => l.status === "ok");
  const pick = (source, key) => done.map(l => [l.round, (l[source] || {})[key]]);
  const charts = document.getElementById("charts");
  charts.replaceChildren(
    chart("AUROC", {"held-out": pick("held_out", "auroc"), "sites, pooled": pick("evaluate", "auroc")}),
    chart("loss", {"held-out": pick("held_out", "loss"), "sites, pooled": pick("evaluate", "loss"),
                   "training": done.map(l => [l.round, (l.train || {}).loss])}),
    chart("sensitivity / specificity (held-out)", {"sensitivity": pick("held_out", "sensitivity"),
                                                   "specificity": pick("held_out", "specificity")}));
  const sites = [...new Set(done.flatMap(l => Object.keys(l.privacy || {})))].sort();
  const budgets = [...new Set(done.flatMap(l => Object.values(l.privacy || {}).map(p => p["max-epsilon"])))];
  const epsilon = {};
  for (const site of sites) epsilon[site] = done.map(l => [l.round, ((l.privacy || {})[site] || {}).epsilon]);
  charts.appendChild(chart("epsilon per site (dashed: budget)", epsilon, budgets.filter(b => typeof b === "number")));
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const l of lines) {
    const row = body.insertRow();
    row.id = "round-" + l.round;
    cell(row, l.round);
    cell(row, l.status, l.status);
    cell(row, Object.keys((l.train || {}).sites || {}).sort().join(", ") || "n/a");
    cell(row, (l.failures || []).map(f => (f.site || "node " + f.node_id) + " (" + f.stage + "): " + f.reason)
      .join("; ") || "none");
    cell(row, fmt((l.held_out || {}).auroc));
    cell(row, fmt((l.evaluate || {}).auroc));
    cell(row, l.wall_time_s);
  }
}

async function runPage() {
  await showUser();
  const runId = decodeURIComponent(location.pathname.split("/").pop());
  const run = await api("/api/runs/" + encodeURIComponent(runId));
  document.getElementById("title").textContent = "Run " + run.name;
  const state = document.getElementById("state");
  let lines = [];
  const socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host +
                               "/api/runs/" + encodeURIComponent(runId) + "/live");
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "missing") { state.textContent = "the run folder is gone: " + message.folder; return; }
    lines = message.type === "reset" ? message.lines : lines.concat(message.lines);
    const last = lines.length ? lines[lines.length - 1] : null;
    state.textContent = "live: " + lines.length + " round(s)" + (last ? ", last round " + last.round + " " +
      last.status : "") + ((message.problems || []).length ? "; " + message.problems.join("; ") : "");
    drawRun(lines);
  };
  socket.onclose = (event) => { state.textContent = "not live (" + (event.reason || "connection closed") + ")"; };
}

const PAGES = {login: loginPage, runs: runsPage, run: runPage};
document.addEventListener("DOMContentLoaded", () => {
  PAGES[document.body.dataset.page]().catch(e => { if (e.message !== "not logged in") console.error(e); });
});
