// MedFusion-FL console pages: plain DOM and SVG, no library, nothing loaded from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name (an identifier; nothing is fetched)
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

async function api(path, options = {}) {
  const response = await fetch(path, {credentials: "same-origin", ...options});
  if (response.status === 401 && document.body.dataset.page !== "login") {
    if (!window.leaving) {  // once: a page's parallel requests must not start two navigations
      window.leaving = true;
      location.replace("/login?next=" + encodeURIComponent(location.pathname));
    }
    throw new Error("not logged in");
  }
  const body = await response.json();
  if (!response.ok) {
    const error = new Error(typeof body.detail === "string" ? body.detail : response.statusText);
    error.detail = body.detail;  // {errors: {key: message}} for a form
    throw error;
  }
  return body;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "n/a" : text;
  if (cls) td.className = cls;
  return td;
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "n/a"; }

const ROLES = ["viewer", "operator", "admin"];
function can(me, role) { return ROLES.indexOf(me.role) >= ROLES.indexOf(role); }

async function showUser() {
  const me = await api("/api/me");
  const who = document.getElementById("who");
  const account = el("a", me.name + " (" + me.role + ")", {href: "/account", title: "your account: change password"});
  const logout = el("button", "log out", {id: "logout", type: "button"});
  logout.addEventListener("click", async () => {
    try { await post("/api/logout"); } finally { location.replace("/login"); }
  });
  who.replaceChildren(account, logout);
  window.CSRF = me.csrf;
  const nav = document.getElementById("nav");
  if (nav) {
    const links = [["/", "runs"]].concat(can(me, "operator") ? [["/start", "start a run"]] : [])
      .concat(can(me, "admin") ? [["/users", "users"]] : []);
    nav.replaceChildren(...links.map(([href, text]) => {
      const a = document.createElement("a"); a.href = href; a.textContent = text; return a; }));
  }
  return me;
}

// A page for `role` and above: its #allowed part shown, or for a lower role only a line saying why (the API refuses
// that role anyway; the page does not offer what it cannot do).
function onlyFor(me, role, what) {
  if (can(me, role)) { document.getElementById("allowed").hidden = false; return true; }
  const refused = document.getElementById("refused");
  refused.textContent = "You are signed in as " + me.name + ", a " + me.role + ". " + what + " needs the " + role +
    " role; ask an admin of this console.";
  refused.hidden = false;
  return false;
}

// A refused form's errors ({errors: {key: message}} from the API, else the plain message), each beside its field
// (the element `prefix` + key) or, for a key without one, in the form's general line #error-.
function showErrors(e, prefix = "error-") {
  for (const [key, message] of Object.entries((e.detail && e.detail.errors) || {"": e.message})) {
    (document.getElementById(prefix + key) || document.getElementById("error-")).textContent = message;
  }
}

// A state-changing request: JSON body, the session's CSRF token.
function post(path, body, method = "POST") {
  return api(path, {method, headers: {"Content-Type": "application/json", "X-CSRF-Token": window.CSRF},
                    body: body === undefined ? undefined : JSON.stringify(body)});
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// a time the API sends in UTC, shown in the viewer's own zone, labelled with it ("long" time carries the zone;
// Intl refuses timeZoneName beside dateStyle)
function when(iso) {
  return new Date(iso).toLocaleString(undefined, {dateStyle: "medium", timeStyle: "long"});
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
    cell(row, run.state + (run.last_error ? ": " + run.last_error : ""),
         {finished: "ok", running: "ok", failed: "failed", stopped: "failed"}[run.state] || "");
    cell(row, run.rounds);
    cell(row, run.last_round);
    cell(row, run.has_model ? "model.onnx" : "");
    cell(row, run.problems.join("; "));
  }
}

async function startedRun(name) {  // the run id of a folder, once its run.json is written
  for (let i = 0; i < 360; i++) {
    const found = (await api("/api/runs")).find(r => r.name === name);
    if (found) return found.id;
    await new Promise(r => setTimeout(r, 500));
  }
  throw new Error("run " + name + " did not appear within 3 minutes; see the runs page");
}

// One line chart: series = {label: [[x, y], ...]}; axis titles `x` and `y` (with the unit); a grey dashed line
// per value of `marks`. Series differ in colour, dash and marker, so one drawn on another still shows; a series
// that coincides with an earlier one says so in the legend; every point names its value when hovered.
const DASHES = ["", "7 4", "2 3", "9 3 2 3"];
const MARKERS = ["circle", "square", "triangle", "diamond"];

function chart(title, series, {x = "round", y = "", marks = []} = {}) {
  const w = 360, h = 226, left = 54, bottom = 38, top = 8, right = 10;
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
  const X = v => left + (v - x0) / (x1 - x0) * (w - left - right);
  const Y = v => top + (1 - (v - y0) / (y1 - y0)) * (h - top - bottom);
  const add = (name, attrs, parent = svg) => {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    parent.appendChild(node);
    return node;
  };
  add("line", {x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, stroke: "#888"});
  add("line", {x1: left, y1: top, x2: left, y2: h - bottom, stroke: "#888"});
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    add("text", {x: left - 4, y: Y(v) + 4, "font-size": 10, "text-anchor": "end"}).textContent = v.toFixed(2);
  }
  for (const v of [...new Set(xs)]) {
    add("text", {x: X(v), y: h - bottom + 13, "font-size": 10, "text-anchor": "middle"}).textContent = v;
  }
  add("text", {x: left + (w - left - right) / 2, y: h - 4, "font-size": 11, "text-anchor": "middle",
               class: "axis-title x"}).textContent = x;
  const middle = top + (h - top - bottom) / 2;
  add("text", {x: 12, y: middle, "font-size": 11, "text-anchor": "middle", class: "axis-title y",
               transform: "rotate(-90 12 " + middle + ")"}).textContent = y;
  for (const m of marks) add("line", {x1: left, y1: Y(m), x2: w - right, y2: Y(m), stroke: "#999",
                                      "stroke-dasharray": "4 3"});
  const legend = document.createElement("div");
  legend.className = "legend";
  const drawn = [];
  Object.entries(series).forEach(([label, pts], i) => {
    const colour = COLOURS[i % COLOURS.length], dash = DASHES[i % DASHES.length];
    const shown = pts.filter(p => typeof p[1] === "number");
    if (!shown.length) return;
    const line = add("polyline", {points: shown.map(p => X(p[0]) + "," + Y(p[1])).join(" "), fill: "none",
                                  stroke: colour, "stroke-width": 2});
    if (dash) line.setAttribute("stroke-dasharray", dash);
    const shape = MARKERS[i % MARKERS.length];
    for (const p of shown) {
      const mark = marker(add, shape, X(p[0]), Y(p[1]), colour);
      add("title", {}, mark).textContent = label + ", " + x + " " + p[0] + ": " + fmt(p[1]);
    }
    const same = drawn.find(([, other]) => other.length === shown.length &&
      other.every((p, k) => p[0] === shown[k][0] && Math.abs(p[1] - shown[k][1]) < 1e-9));
    const key = document.createElement("span");
    key.style.color = colour;
    key.textContent = {circle: "\u25cf", square: "\u25a0", triangle: "\u25b2", diamond: "\u25c6"}[shape] + " " +
      label + (same ? " (on " + same[0] + "'s line)" : "");
    legend.appendChild(key);
    drawn.push([label, shown]);
  });
  box.appendChild(legend);
  return box;
}

function marker(add, shape, cx, cy, colour) {  // a point of a series, outlined in white to stand out from lines
  const style = {fill: colour, stroke: "#fff", "stroke-width": 1};
  if (shape === "circle") return add("circle", {cx, cy, r: 3.5, ...style});
  if (shape === "square") return add("rect", {x: cx - 3.5, y: cy - 3.5, width: 7, height: 7, ...style});
  const d = shape === "triangle" ? [[0, -4.5], [4, 3], [-4, 3]] : [[0, -4.5], [4, 0], [0, 4.5], [-4, 0]];
  return add("polygon", {points: d.map(([dx, dy]) => (cx + dx) + "," + (cy + dy)).join(" "), ...style});
}

// the page scripts (run.js, start.js, compare.js, users.js) add theirs
const PAGES = {login: loginPage, runs: runsPage};
document.addEventListener("DOMContentLoaded", () => {
  // a page function may be plain (the login page) or async: either way its errors end here
  Promise.resolve().then(() => PAGES[document.body.dataset.page]())
    .catch(e => { if (e.message !== "not logged in") console.error(e); });
});
