// The setpoint console's only script (served from the binary; the Content-Security-Policy
// allows no inline script). It adds to pages that work without it: live status over
// server-sent events, confirmation before destructive forms, one submit per form.
"use strict";

function liveUpdates() {
  const holder = document.querySelector("[data-live]");
  if (!holder || !window.EventSource) return;
  const names = holder.dataset.live;
  if (!names) return;
  // The parts of a resource's page the server renders again after a change: its details
  // (generation, observed state, conditions) and its timeline.
  const fragments = [];
  if (holder.dataset.details) fragments.push([holder.dataset.details, "details"]);
  if (holder.dataset.timeline) fragments.push([holder.dataset.timeline, "timeline"]);
  const source = new EventSource("/events?names=" + encodeURIComponent(names));
  source.addEventListener("resource", (ev) => {
    const r = JSON.parse(ev.data);
    for (const el of document.querySelectorAll("[data-resource]")) {
      if (el.dataset.resource !== r.name) continue;
      const fields = el.dataset.field ? [el] : el.querySelectorAll("[data-field]");
      for (const f of fields) {
        const name = f.dataset.field;
        if (name === "status") {
          f.textContent = r.status;
          f.className = "status " + r.status.toLowerCase();
        } else if (name === "active") {
          f.textContent = r.active ? "running" : "";
        } else if (name in r) {
          f.textContent = r[name];
        }
      }
    }
    if (fragments.length) refreshFragments(fragments);
  });
  source.addEventListener("gone", (ev) => {
    const r = JSON.parse(ev.data);
    for (const el of document.querySelectorAll("[data-resource]")) {
      if (el.dataset.resource !== r.name) continue;
      const f = el.dataset.field === "status" ? el : el.querySelector("[data-field=status]");
      if (f) { f.textContent = "DELETED"; f.className = "status deleted"; }
    }
  });
  source.addEventListener("signed-out", () => {
    source.close();
    window.location.assign("/sign-in");
  });
}

let fetching = false;
let again = false;
async function refreshFragments(fragments) {
  // One refresh at a time; a change that arrives meanwhile asks for one more, so the page
  // always ends showing what the server had after the last change.
  if (fetching) { again = true; return; }
  fetching = true;
  try {
    do {
      again = false;
      for (const [url, id] of fragments) {
        const response = await fetch(url, { credentials: "same-origin" });
        // A redirect means the session ended (the sign-in page): the stream says so too.
        if (!response.ok || response.redirected) continue;
        const html = await response.text();
        const old = document.getElementById(id);
        // The fragment is the server's own escaped HTML (the same template as the page).
        if (old) old.outerHTML = html;
      }
    } while (again);
  } finally {
    fetching = false;
  }
}

function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  }
}

function submitOnce() {
  // A second click would send the same request id and be answered from the first; disabling
  // the button only spares the round trip.
  for (const form of document.querySelectorAll("form[method=post]")) {
    form.addEventListener("submit", (ev) => {
      if (ev.defaultPrevented) return;
      for (const b of form.querySelectorAll("button[type=submit]")) b.disabled = true;
    });
  }
}

function autoSubmit() {
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    for (const s of form.querySelectorAll("select")) {
      s.addEventListener("change", () => form.submit());
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  liveUpdates();
  confirmations();
  submitOnce();
  autoSubmit();
});
