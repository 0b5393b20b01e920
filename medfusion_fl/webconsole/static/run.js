// The run page: live curves, the sites' table, the round timeline, the controls and the model versions.
"use strict";

function runCharts(summaries) {
  const done = summaries.filter(s => s.status === "ok");
  const pick = (source, key) => done.map(s => [s.round, (s[source] || {})[key]]);
  const sites = [...new Set(done.flatMap(s => Object.keys(s.epsilon || {})))].sort();
  const epsilon = {};
  for (const site of sites) epsilon[site] = done.map(s => [s.round, (s.epsilon || {})[site]]);
  const budgets = [...new Set(done.flatMap(s => s.budgets || []))];
  return [
    chart("AUROC", {"held-out": pick("held_out", "auroc"), "sites, pooled": pick("evaluate", "auroc")},
          {y: "AUROC (0 to 1)"}),
    chart("loss", {"held-out": pick("held_out", "loss"), "sites, pooled": pick("evaluate", "loss"),
                   "training": done.map(s => [s.round, s.train_loss])}, {y: "cross-entropy (nats)"}),
    chart("accuracy", {"held-out": pick("held_out", "accuracy"), "sites, pooled": pick("evaluate", "accuracy")},
          {y: "accuracy (0 to 1)"}),
    chart("sensitivity / specificity", {"held-out sens.": pick("held_out", "sensitivity"),
      "held-out spec.": pick("held_out", "specificity"), "pooled sens.": pick("evaluate", "sensitivity"),
      "pooled spec.": pick("evaluate", "specificity")}, {y: "rate (0 to 1)"}),
    chart("epsilon per site (grey dashed: budget)", epsilon, {y: "epsilon (at the run's delta)", marks: budgets})];
}

// Under DP the sites' pooled curves are read from noisy sums: say so beside them, with where the ranges are.
function noiseNote(summaries) {
  const note = document.getElementById("noise");
  note.hidden = !summaries.some(s => s.dp_noise);
  note.textContent = "The sites' pooled curves are read from their DP-noised validation release: with few " +
    "validation patients the noise can outweigh the counts, so these curves may sit far from the held-out ones " +
    "and jump between rounds. The rounds table gives, in brackets, the 95% range the noise alone gives each " +
    "round's pooled AUROC; the held-out curves carry no noise.";
}

function drawSites(details) {
  const latest = {};
  for (const d of details) for (const [site, info] of Object.entries(d.sites)) latest[site] = {...info, round: d.round};
  const body = document.querySelector("#sites tbody");
  body.replaceChildren();
  for (const site of Object.keys(latest).sort()) {
    const info = latest[site];
    const row = body.insertRow();
    row.id = "site-" + site;
    cell(row, site);
    cell(row, info.round);
    cell(row, info.status, info.status === "trained" ? "ok" : "failed");
    cell(row, info.reason || "");
    cell(row, typeof info.epsilon === "number" ? fmt(info.epsilon) + " of " + info.budget : "n/a");
  }
}

function drawTimeline(details) {
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const d of details.slice().reverse()) {
    const row = body.insertRow();
    row.id = "round-" + d.round;
    cell(row, d.round);
    cell(row, d.status + (d.reason ? ": " + d.reason : ""), d.status);
    const chips = row.insertCell();
    for (const [site, info] of Object.entries(d.sites)) {
      const chip = el("span", site, {class: "chip " + (info.status === "trained" ? "ok" : "failed"),
                                     title: info.status + (info.reason ? ": " + info.reason : "")});
      chips.appendChild(chip);
    }
    cell(row, Object.entries(d.sites).filter(([, i]) => i.reason).map(([s, i]) => s + " (" + i.status + "): " +
      i.reason).join("; ") || "none");
    cell(row, fmt(d.held_out.auroc));
    const band = (d.evaluate_noise || {}).auroc;
    cell(row, fmt(d.evaluate.auroc) + (band ? " [" + fmt(band[0]) + ", " + fmt(band[1]) + "]" : ""));
    cell(row, d.wall_time_s);
  }
}

async function drawVersions(me, run) {
  const versions = await api("/api/runs/" + encodeURIComponent(run.id) + "/versions");
  const exported = versions.filter(v => v.name.startsWith("exports/")).length;
  if (window.exportsPending && exported > (window.exportsSeen || 0)) {
    window.exportsPending -= 1;
    document.getElementById("action").textContent = "exported: " +
      versions.filter(v => v.name.startsWith("exports/")).map(v => v.name).join(", ");
  }
  window.exportsSeen = exported;
  const body = document.querySelector("#versions tbody");
  const ticked = new Set([...body.querySelectorAll(".pick:checked")].map(b => b.dataset.version));
  body.replaceChildren();
  for (const v of versions) {
    const row = body.insertRow();
    row.id = "version-" + v.name.replace(/[^A-Za-z0-9-]/g, "_");
    const pickCell = row.insertCell();
    const box = el("input", null, {type: "checkbox", class: "pick", "data-run": run.id, "data-version": v.name,
                                   "aria-label": "compare " + v.name});
    box.checked = ticked.has(v.name);
    pickCell.appendChild(box);
    cell(row, v.name);
    cell(row, v.kind);
    cell(row, v.round);
    cell(row, when(v.created));
    const files = row.insertCell();
    for (const f of v.files) {
      const link = el("a", f.split("/").pop(), {href: "/api/runs/" + encodeURIComponent(run.id) + "/files/" + f});
      if (!f.endsWith(".html")) link.setAttribute("download", "");
      files.appendChild(link);
      files.appendChild(document.createTextNode(" "));
    }
    if (v.kind === "checkpoint" && can(me, "operator")) {
      const button = el("button", "export to ONNX", {class: "export"});
      button.addEventListener("click", () => act("export of " + v.name, async () => {
        const job = await post("/api/runs/" + encodeURIComponent(run.id) + "/versions/" + encodeURIComponent(v.name) +
                               "/export");
        window.exportsPending = (window.exportsPending || 0) + 1;
        return job;
      }));
      files.appendChild(button);
    }
  }
  // compare: two ticked versions, here or remembered from another run's page
  document.getElementById("compare").onclick = () => {
    const ticked = [...document.querySelectorAll(".pick:checked")].map(b => [b.dataset.run, b.dataset.version]);
    const kept = JSON.parse(sessionStorage.getItem("compare") || "null");
    const pair = ticked.length >= 2 ? ticked.slice(0, 2) : ticked.length === 1 && kept ? [kept, ticked[0]] : null;
    if (!pair) {
      if (ticked.length === 1) sessionStorage.setItem("compare", JSON.stringify(ticked[0]));
      document.getElementById("action").textContent = ticked.length === 1 ?
        "kept " + ticked[0][1] + ": tick another version (on this or another run's page) and compare" :
        "tick two versions to compare";
      return;
    }
    sessionStorage.removeItem("compare");
    location.href = "/compare?" + new URLSearchParams({a: pair[0][0], av: pair[0][1], b: pair[1][0], bv: pair[1][1]});
  };
}

async function act(what, call) {
  const note = document.getElementById("action");
  note.textContent = what + "...";
  try {
    const answer = await call();
    note.textContent = what + ": " + (answer.status || (answer.running ? "running (pid " + answer.pid + ")" : "done"));
  } catch (e) { note.textContent = what + " refused: " + e.message; }
}

function showState(run) {  // the process and pause line, which buttons apply, the TensorBoard folder
  document.getElementById("tensorboard").textContent = run.tensorboard ?
    "TensorBoard: tensorboard --logdir " + run.tensorboard : "no TensorBoard folder (yet)";
  const running = run.job ? run.job.running : null;  // null: not started here (a deployment, another shell)
  document.getElementById("pause").disabled = running === false || run.has_model;
  document.getElementById("resume").disabled = running === true || run.has_model;
  document.getElementById("stop").disabled = running === false;
  document.getElementById("job").textContent = jobText(run);
}

function jobText(run) {
  const control = run.control || {}, job = run.job;
  const parts = [];
  if (job) parts.push(job.running ? (job.stopped_by ? "stopping (requested by " + job.stopped_by + ")" :
                                     "running (pid " + job.pid + ", started by " + job.started_by + ")") :
                      "process ended (" + job.ended + ")");
  if (control.paused_after_round) parts.push("paused after round " + control.paused_after_round);
  else if (control.pause) parts.push("pause requested by " + control.by + ": stops after its current round");
  if (run.has_model) parts.push("finished: model.onnx exported");
  else if (run.state !== "running") parts.push(run.state + (run.last_error ? ": " + run.last_error : ""));
  return parts.join("; ") || "not started by this console";
}

function openLive(runId, page) {  // the run's rounds as they come, over WebSocket
  const state = document.getElementById("state");
  let summaries = [], details = [], problems = [], versionsAt = 0;
  const socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host +
                               "/api/runs/" + encodeURIComponent(runId) + "/live");
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "missing") { state.textContent = "the run folder is gone: " + message.folder; return; }
    if (message.problems) problems = message.problems;
    if (message.type === "history") summaries = message.summaries.concat(summaries);  // the older rounds
    else summaries = message.type === "reset" ? message.summaries : summaries.concat(message.summaries);
    if (message.type !== "history") {
      details = (message.type === "reset" ? message.details : details.concat(message.details)).slice(-30);
    }
    const last = summaries.length ? summaries[summaries.length - 1] : null;
    state.textContent = "live: " + summaries.length + " round(s)" + (last ? ", last round " + last.round + " " +
      last.status : "") + (problems.length ? "; " + problems.join("; ") : "");
    document.getElementById("charts").replaceChildren(...runCharts(summaries));
    noiseNote(summaries);
    drawSites(details);
    drawTimeline(details);
    if (page.run && summaries.length !== versionsAt) {  // a round ends with a checkpoint: a new version
      versionsAt = summaries.length;
      drawVersions(page.me, page.run).catch(e => console.error("versions:", e));
    }
  };
  socket.onclose = (event) => { state.textContent = "not live (" + (event.reason || "connection closed") + ")"; };
}

async function runPage() {
  const runId = decodeURIComponent(location.pathname.split("/").pop());
  const page = {me: null, run: null};
  openLive(runId, page);  // first: the page's data does not wait on the two requests below
  const [me, run] = await Promise.all([showUser(), api("/api/runs/" + encodeURIComponent(runId))]);
  Object.assign(page, {me, run});
  document.getElementById("title").textContent = "Run " + run.name;
  if (can(me, "operator")) {
    document.getElementById("controls").hidden = false;
    const job = "/api/jobs/" + encodeURIComponent(run.name);
    for (const verb of ["pause", "resume", "stop"]) {
      document.getElementById(verb).addEventListener("click", () => act(verb, () => post(job + "/" + verb)));
    }
  }
  drawVersions(me, run).catch(e => {
    document.getElementById("action").textContent = e.message;
    console.error("versions:", e);
  });
  const jobLine = document.getElementById("job");
  showState(run);
  let lastState = jobLine.textContent;
  const refresh = async () => {  // the process and pause state; the versions again when either changed
    showState(await api("/api/runs/" + encodeURIComponent(runId)));
    if (jobLine.textContent !== lastState || window.exportsPending) {
      lastState = jobLine.textContent;
      await drawVersions(me, run);
    }
  };
  setInterval(() => refresh().catch(e => console.warn("refresh:", e)), 2000);
}

PAGES.run = runPage;
