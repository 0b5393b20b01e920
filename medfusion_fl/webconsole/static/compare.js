// The comparison of two model versions: config diff, metrics, per-site tables, curves overlaid.
"use strict";

const METRIC_NAMES = ["auroc", "auprc", "loss", "accuracy", "sensitivity", "specificity"];

function table(id, head, rows) {
  const t = el("table", null, {id});
  const header = t.createTHead().insertRow();
  for (const h of head) header.appendChild(el("th", h));
  const body = t.createTBody();
  for (const r of rows) {
    const row = body.insertRow();
    for (const v of r) cell(row, typeof v === "number" ? fmt(v) : v);
  }
  return t;
}

function label(side) { return side.run_name + " / " + side.version + (side.round ? " (round " + side.round + ")" : ""); }

async function comparePage() {
  await showUser();
  const query = new URLSearchParams(location.search);
  const out = document.getElementById("comparison");
  const status = document.getElementById("loading");
  if (!["a", "av", "b", "bv"].every(k => query.get(k))) {
    refuse(status, "This page compares two model versions: tick two on a run's page (or one on each of two runs' " +
           "pages) and press \"Compare ticked versions\".");
    return;
  }
  let result;
  try {
    result = await api("/api/compare?" + query);
  } catch (e) {
    if (e.message === "not logged in") throw e;
    refuse(status, "Cannot compare " + query.get("av") + " of run " + query.get("a") + " with " + query.get("bv") +
           " of run " + query.get("b") + ": " + e.message);
    return;
  }
  status.remove();
  const {a, b} = result;
  document.getElementById("title").textContent = "A: " + label(a) + "  vs  B: " + label(b);
  out.appendChild(el("h2", "Config: keys that differ"));
  out.appendChild(result.config_diff.length ?
    table("config-diff", ["key", "A", "B"], result.config_diff.map(d => [d.key, JSON.stringify(d.a), JSON.stringify(d.b)])) :
    el("p", "the two versions were trained with the same config", {id: "config-diff"}));
  out.appendChild(el("h2", "Metrics at the version's round"));
  out.appendChild(table("metrics", ["metric", "A held-out", "B held-out", "A sites pooled", "B sites pooled"],
    METRIC_NAMES.map(m => [m, a.held_out[m], b.held_out[m], a.evaluate[m], b.evaluate[m]])));
  out.appendChild(el("h2", "Sites"));
  const sites = [...new Set(a.sites.concat(b.sites).map(s => s.site))].sort();
  const find = (side, site) => side.sites.find(s => s.site === site) || {};
  out.appendChild(table("per-site", ["site", "A status", "A epsilon", "B status", "B epsilon"],
    sites.map(s => [s, find(a, s).status || "n/a", find(a, s).epsilon, find(b, s).status || "n/a",
                    find(b, s).epsilon])));
  out.appendChild(el("h2", "Curves (A and B overlaid)"));
  const box = el("div", null, {class: "charts"});
  const series = (side, source, key) => side.curves.filter(s => s.status === "ok").map(s => [s.round, (s[source] || {})[key]]);
  const highest = side => side.curves.filter(s => s.status === "ok").map(s => {
    const values = Object.values(s.epsilon || {}).filter(v => typeof v === "number");
    return [s.round, values.length ? Math.max(...values) : null];
  });
  box.appendChild(chart("held-out AUROC", {A: series(a, "held_out", "auroc"), B: series(b, "held_out", "auroc")},
                        {y: "AUROC (0 to 1)"}));
  box.appendChild(chart("pooled AUROC", {A: series(a, "evaluate", "auroc"), B: series(b, "evaluate", "auroc")},
                        {y: "AUROC (0 to 1)"}));
  box.appendChild(chart("held-out loss", {A: series(a, "held_out", "loss"), B: series(b, "held_out", "loss")},
                        {y: "cross-entropy (nats)"}));
  box.appendChild(chart("highest epsilon of a site", {A: highest(a), B: highest(b)}, {y: "epsilon"}));
  out.appendChild(box);
}

function refuse(status, message) {  // the page says what went wrong, with the way back
  status.className = "refused";
  status.id = "compare-error";
  status.replaceChildren(el("span", message + " "), el("a", "Back to the runs", {href: "/"}));
}

PAGES.compare = comparePage;
