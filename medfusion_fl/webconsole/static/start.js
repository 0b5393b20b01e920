// The start page: a form generated from the run config's schema (GET /api/config); errors beside each field.
"use strict";

function inputFor(key) {
  let input;
  if (key.type === "bool") {
    input = el("select");
    for (const v of ["true", "false"]) input.appendChild(el("option", v, {value: v}));
  } else {
    input = el("input", null, {type: key.type === "int" || key.type === "float" ? "number" : "text",
                               step: key.type === "int" ? "1" : "any"});
  }
  input.id = "key-" + key.key;
  input.dataset.key = key.key;
  input.dataset.type = key.type;
  if (key.fixed) input.disabled = true;
  return input;
}

function valueOf(input) {
  const raw = input.value;
  if (input.dataset.type === "bool") return raw === "true";
  if ((input.dataset.type === "int" || input.dataset.type === "float") && raw.trim() !== "" && !isNaN(Number(raw))) {
    return Number(raw);
  }
  return raw;  // left as typed: the server names what is wrong with it
}

function shown(value) { return typeof value === "boolean" ? String(value) : value === null ? "" : String(value); }

async function startPage() {
  if (!onlyFor(await showUser(), "operator", "Starting a run")) return;
  const config = await api("/api/config");
  const presetBox = document.getElementById("preset");
  for (const name of Object.keys(config.presets).sort()) presetBox.appendChild(el("option", name, {value: name}));
  presetBox.value = config.presets["tiny-cpu"] ? "tiny-cpu" : presetBox.options[0].value;
  const form = document.getElementById("keys");
  const sections = {};
  for (const key of config.keys) {
    const section = key.key.split(".")[0];
    if (!sections[section]) {
      const box = el("details");
      box.appendChild(el("summary", section));
      box.id = "section-" + section;
      form.appendChild(box);
      sections[section] = box;
    }
    const field = el("div", null, {class: "field"});
    field.appendChild(el("label", key.key, {for: "key-" + key.key}));
    field.appendChild(inputFor(key));
    field.appendChild(el("div", key.description + (key.fixed ? " (set by the console)" : ""), {class: "help"}));
    field.appendChild(el("div", "", {class: "error", id: "error-" + key.key}));
    sections[section].appendChild(field);
  }
  const baseline = () => ({...Object.fromEntries(config.keys.map(k => [k.key, k.default])),
                           ...config.presets[presetBox.value]});
  const fill = () => {
    const base = baseline();
    for (const input of form.querySelectorAll("[data-key]")) input.value = shown(base[input.dataset.key]);
  };
  presetBox.addEventListener("change", fill);
  fill();
  document.getElementById("start").addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const e of document.querySelectorAll(".error")) e.textContent = "";
    const base = baseline();
    const settings = {};
    for (const input of form.querySelectorAll("[data-key]:not([disabled])")) {
      const value = valueOf(input);
      if (shown(value) !== shown(base[input.dataset.key])) settings[input.dataset.key] = value;
    }
    const name = document.getElementById("name").value;
    try {
      await post("/api/runs", {name, preset: presetBox.value, settings});
      document.getElementById("error-").textContent = "started; waiting for its run folder...";
      location.href = "/runs/" + encodeURIComponent(await startedRun(name));
    } catch (e) {
      const errors = (e.detail && e.detail.errors) || {"": e.message};
      for (const [key, message] of Object.entries(errors)) {
        const place = document.getElementById("error-" + key) || document.getElementById("error-");
        place.textContent = (place.id === "error-" && key ? key + ": " : "") + message;
        const section = document.getElementById("section-" + key.split(".")[0]);
        if (section) section.open = true;
      }
    }
  });
}

PAGES.start = startPage;
