// The admin's page: users and roles, and the newest audit entries.
"use strict";

async function drawUsers(me) {
  const body = document.querySelector("#users tbody");
  body.replaceChildren();
  for (const u of await api("/api/users")) {
    const row = body.insertRow();
    row.id = "user-" + u.name;
    cell(row, u.name);
    const roleCell = row.insertCell();
    const select = el("select", null, {"aria-label": "role of " + u.name});
    for (const r of ROLES) select.appendChild(el("option", r, {value: r}));
    select.value = u.role;
    select.disabled = u.name === me.name;
    select.addEventListener("change", () => change(() => post("/api/users/" + encodeURIComponent(u.name),
                                                                {role: select.value}, "PATCH"), me));
    roleCell.appendChild(select);
    cell(row, when(u.created));
    const actions = row.insertCell();
    if (u.name !== me.name) {
      const password = el("input", null, {type: "password", autocomplete: "new-password", class: "reset",
                                          "aria-label": "new password for " + u.name, placeholder: "new password"});
      const reset = el("button", "reset password", {class: "reset"});
      reset.addEventListener("click", () => change(() => post("/api/users/" + encodeURIComponent(u.name) +
                                                                "/password", {password: password.value}), me));
      actions.append(password, reset);
      const remove = el("button", "remove");
      remove.addEventListener("click", () => change(() => post("/api/users/" + encodeURIComponent(u.name),
                                                                 undefined, "DELETE"), me));
      actions.appendChild(remove);
    }
  }
  const audit = document.querySelector("#audit tbody");
  audit.replaceChildren();
  for (const a of await api("/api/audit?limit=50")) {
    const row = audit.insertRow();
    cell(row, when(a.when));
    cell(row, a.who);
    cell(row, a.action);
    cell(row, a.detail);
  }
}

async function change(call, me) {
  const note = document.getElementById("error-");
  note.textContent = "";
  note.className = "error";
  try {
    const answer = await call();
    if (answer && answer.status) { note.textContent = answer.status; note.className = "done"; }
  } catch (e) { note.textContent = formError(e); }
  await drawUsers(me);
}

function formError(e) {  // a form's {errors: {key: message}} as one line, or the plain message
  const errors = e.detail && e.detail.errors;
  return errors ? Object.values(errors).join("; ") : e.message;
}

async function usersPage() {
  const me = await showUser();
  if (!onlyFor(me, "admin", "Managing users")) return;
  await drawUsers(me);
  document.getElementById("add").addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const e of document.querySelectorAll("#add .error")) e.textContent = "";
    try {
      await post("/api/users", {name: document.getElementById("new-name").value,
        role: document.getElementById("new-role").value, password: document.getElementById("new-password").value});
      document.getElementById("add").reset();
      await drawUsers(me);
    } catch (e) { showErrors(e, "error-new-"); }
  });
}

PAGES.users = usersPage;
