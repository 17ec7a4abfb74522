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

// A new device's key pair, made here (WebCrypto X25519): the public key goes
// to the server, the private key only into the file this page shows, once.
const DEVICE_KEY = "twistvpn-device-key:";

function base64(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes)));
}

function deviceKeys(form) {
  form.addEventListener("submit", async (event) => {
    const field = form.elements.public_key;
    if (field.value.trim() || !window.crypto || !crypto.subtle) return;
    event.preventDefault();
    try {
      const pair = await crypto.subtle.generateKey({name: "X25519"}, true, ["deriveBits"]);
      const pkcs8 = await crypto.subtle.exportKey("pkcs8", pair.privateKey);
      const raw = await crypto.subtle.exportKey("raw", pair.publicKey);
      // PKCS#8 of an X25519 key ends with the 32 raw bytes of the private key.
      field.value = base64(raw);
      sessionStorage.setItem(DEVICE_KEY + field.value, base64(pkcs8.slice(-32)));
    } catch (e) {
      // no X25519 here: the form goes without a key, and the server says what is missing
    }
    form.submit();
  });
}

function fillDeviceKey(pre) {
  const stored = DEVICE_KEY + pre.dataset.publicKey;
  const secret = sessionStorage.getItem(stored);
  if (!secret) return;
  sessionStorage.removeItem(stored);
  pre.textContent = pre.textContent.replace(pre.dataset.placeholder, secret);
  const note = document.getElementById("device-key-note");
  if (note) note.textContent = "Its private key was made in this browser and is only in " +
    "this file: copy it now, it is not shown again.";
}

document.addEventListener("DOMContentLoaded", () => {
  autoSubmit(document);
  const addDevice = document.getElementById("add-device");
  if (addDevice) deviceKeys(addDevice);
  const config = document.getElementById("device-config");
  if (config) fillDeviceKey(config);
  const tbody = document.getElementById("members");
  if (tbody && tbody.dataset.src) liveTable(tbody);
});
