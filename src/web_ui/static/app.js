// kpr's web view: polls /ui/services and /ui/counters, tails /ui/events.
"use strict";

const MAX_EVENTS = 200;
let rows = [];
let samples = [];

function filterText() {
  return document.getElementById("filter").value.trim();
}

function shown(service) {
  const f = filterText();
  return f === "" || (service || "").includes(f);
}

function counterText(row) {
  // Every sample labelled with this frontend or its Service.
  return samples
    .filter((s) => s.labels.frontend === row.frontend ||
      (row.service && s.labels.service === row.service))
    .map((s) => {
      const rest = Object.entries(s.labels)
        .filter(([k]) => k !== "frontend" && k !== "service")
        .map(([k, v]) => `${k}=${v}`).join(",");
      return `${s.family}${rest ? "{" + rest + "}" : ""} ${s.value}`;
    }).join("\n");
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function render() {
  const body = document.querySelector("#services tbody");
  body.replaceChildren();
  for (const row of rows.filter((r) => shown(r.service))) {
    const tr = document.createElement("tr");
    cell(tr, String(row.id));
    cell(tr, row.frontend, "mono");
    cell(tr, row.service || "-");
    cell(tr, row.type + (row.lb_algorithm === "maglev" ? " (maglev)" : ""));
    const backends = cell(tr, "", "mono");
    for (const b of row.backends) {
      const div = document.createElement("div");
      div.textContent = `${b.address}:${b.port}/${b.protocol} (${b.state})`;
      if (b.state === "terminating") div.className = "terminating";
      backends.appendChild(div);
    }
    const counters = cell(tr, counterText(row), "mono");
    counters.style.whiteSpace = "pre";
    body.appendChild(tr);
  }
  document.getElementById("updated").textContent =
    `${rows.length} frontends, updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  const error = document.getElementById("services-error");
  try {
    const [s, c] = await Promise.all([fetch("/ui/services"), fetch("/ui/counters")]);
    if (!s.ok) throw new Error(`services: ${s.status} ${await s.text()}`);
    rows = await s.json();
    samples = c.ok ? await c.json() : [];
    error.textContent = "";
  } catch (e) {
    error.textContent = String(e);
  }
  render();
}

function tail() {
  const list = document.getElementById("events");
  const state = document.getElementById("events-state");
  const source = new EventSource("/ui/events");
  source.onopen = () => { state.textContent = "live"; };
  source.onerror = () => { state.textContent = "reconnecting…"; };
  source.onmessage = (m) => {
    let text = m.data;
    try {
      const e = JSON.parse(m.data);
      if (e.service && !shown(e.service)) return;
      text = JSON.stringify(e);
    } catch (_) { /* shown as it came */ }
    const li = document.createElement("li");
    li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    list.prepend(li);
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  };
}

document.getElementById("filter").addEventListener("input", render);
refresh();
setInterval(refresh, 2000);
// `?tail=off`: no event stream (a headless browser's virtual time never
// advances past an open one).
if (new URLSearchParams(location.search).get("tail") !== "off") {
  tail();
} else {
  document.getElementById("events-state").textContent = "off (?tail=off)";
}
