// A user's own page: who they are, and their password (the current one first; other sessions end).
"use strict";

async function accountPage() {
  const me = await showUser();
  document.getElementById("role").textContent = "Signed in as " + me.name + ", " + me.role + ".";
  const form = document.getElementById("password");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const e of form.querySelectorAll(".error, .done")) { e.textContent = ""; e.className = "error"; }
    const fresh = document.getElementById("new").value;
    if (fresh !== document.getElementById("again").value) {
      document.getElementById("error-again").textContent = "the two new passwords differ";
      return;
    }
    try {
      const answer = await post("/api/me/password", {current: document.getElementById("current").value, new: fresh});
      form.reset();
      const done = document.getElementById("error-");
      done.className = "done";
      done.textContent = answer.status;
    } catch (e) { showErrors(e); }
  });
}

PAGES.account = accountPage;
