// twistvpn console: the live member table and the "Auth?" checkbox.  The
// page works without it (forms post, pages reload); with it, ticking Auth?
// saves at once and the table follows joins and changes within a second.
"use strict";

function autoSubmit(root) {
  for (const box of root.querySelectorAll("input.auto-submit")) {
    box.addEventListener("change", () => box.form.submit());
  }
}

function liveTable(tbody) {
  const source = tbody.dataset.src;
  let busy = false;
  let version = "";
  setInterval(async () => {
    // Never under the admin's fingers: skip while a field of the table has focus.
    if (busy || tbody.contains(document.activeElement)) return;
    busy = true;
    try {
      const url = source + "&v=" + encodeURIComponent(version);
      const answer = await fetch(url, {credentials: "same-origin", cache: "no-store"});
      if (answer.redirected || !answer.ok || answer.status === 204) return;
      version = answer.headers.get("x-rows-version") || "";
      const rows = await answer.text();
      if (rows !== tbody.dataset.rows) {
        tbody.dataset.rows = rows;
        if (tbody.innerHTML !== rows) {
          tbody.innerHTML = rows;
          autoSubmit(tbody);
        }
      }
    } catch (e) {
      // the rendezvous restarting: try again at the next tick
    } finally {
      busy = false;
    }
  }, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  autoSubmit(document);
  const tbody = document.getElementById("members");
  if (tbody && tbody.dataset.src) liveTable(tbody);
});
