// The setpoint console's only script (served from the binary; the Content-Security-Policy
// allows no inline script). It adds to pages that work without it: live status over
// server-sent events, confirmation before destructive forms, one submit per form.
"use strict";

function liveUpdates() {
  const holder = document.querySelector("[data-live]");
  if (!holder || !window.EventSource) return;
  const names = holder.dataset.live;
  if (!names) return;
  const timeline = holder.dataset.timeline;
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
    if (timeline) refreshTimeline(timeline);
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

let refreshing = false;
async function refreshTimeline(url) {
  if (refreshing) return;
  refreshing = true;
  try {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.ok) {
      const html = await response.text();
      const old = document.getElementById("timeline");
      // The fragment is the server's own escaped HTML (the same template as the page).
      if (old) old.outerHTML = html;
    }
  } finally {
    refreshing = false;
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
