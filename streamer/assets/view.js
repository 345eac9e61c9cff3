"use strict";
// All drawing is here, with the canvas API: no library, nothing fetched from the internet.
// Rules this file keeps (docs/security.md):
// - a record's fields reach the DOM only through textContent or dataset, never parsed as HTML: a flag's
//   reason or a patient id is text, whatever it contains;
// - each bed is merged and drawn in its own try: one bed the page cannot draw is marked, the others go on;
// - "live" says the drawing loop is running and drew the last update, not just that the stream is open.
const beds = new Map();          // patient id -> {slots, values, flags, episode, latency_ms}
const cards = new Map();         // patient id -> its card element
const broken = new Set();        // beds whose last merge or drawing failed
let stripS = 60, slotNs = 8e6, model = null, selected = null, dirty = new Set(), skipped = 0;
let connected = false, pending = null, lastFrameAt = Date.now();  // pending: what "live" says once drawn
let forgotten = false;           // beds left the page since the last frame: recount

function merge(pid, d) {
  let b = beds.get(pid);
  if (!b) { b = {slots: [], values: [], flags: [], episode: null, latency_ms: null}; beds.set(pid, b); }
  dirty.add(pid);
  // the strip comes as runs of consecutive time slots: [first slot, [mV, ...]]; a missing slot is a gap
  for (const [first, vals] of d.strip) {
    const last = b.slots.length ? b.slots[b.slots.length - 1] : -Infinity;
    vals.forEach((v, i) => { if (first + i > last) { b.slots.push(first + i); b.values.push(v); } });
  }
  const horizon = (b.slots.length ? b.slots[b.slots.length - 1] : 0) - stripS * 1e9 / slotNs;
  let cut = 0; while (cut < b.slots.length && b.slots[cut] < horizon) cut++;
  if (cut) { b.slots.splice(0, cut); b.values.splice(0, cut); }
  addFlags(b, d.flags);
  if (d.episode) b.episode = d.episode;
  if (d.latency_ms !== null && d.latency_ms !== undefined) b.latency_ms = d.latency_ms;
}

function addFlags(b, flags) {
  const seen = new Set(b.flags.map(f => f.window_id));
  for (const f of flags) if (!seen.has(f.window_id)) { b.flags.push(f); seen.add(f.window_id); }
  b.flags.sort((x, y) => x.window_start_ns - y.window_start_ns);
  if (b.flags.length > 360) b.flags.splice(0, b.flags.length - 360);
}

function latestFlag(b) { return b.flags.length ? b.flags[b.flags.length - 1] : null; }
function inArtifact(b) { return (b.episode && b.episode.state === "open") || (latestFlag(b) && latestFlag(b).artifact === true); }
function rank(b) {
  try { return (b.episode && b.episode.state === "open" ? 2 : 0) + (inArtifact(b) ? 1 : 0); } catch (e) { return 0; }
}
function hhmmss(ns) { return new Date(ns / 1e6).toISOString().substr(11, 8); }
function clock() { return new Date().toISOString().substr(11, 8); }

function drawStrip(canvas, b) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  if (!b.slots.length) return;
  const t1 = b.slots[b.slots.length - 1] * slotNs, t0 = t1 - stripS * 1e9;
  const x = t => (t - t0) / (stripS * 1e9) * W;
  // windows: shaded by probability; threshold crossing outlined; no score hatched grey
  for (const f of b.flags) {
    if (f.window_end_ns < t0) continue;
    const x0 = Math.max(x(f.window_start_ns), 0), x1 = x(f.window_end_ns);
    if (f.status === "scored") {
      ctx.fillStyle = `rgba(217,83,79,${0.08 + 0.6 * f.probability})`;
      ctx.fillRect(x0, 0, x1 - x0, H);
      if (f.artifact) { ctx.strokeStyle = "#ff7b72"; ctx.lineWidth = 2; ctx.strokeRect(x0 + 1, 1, x1 - x0 - 2, H - 2); }
    } else {
      ctx.fillStyle = "rgba(138,150,163,0.25)";
      for (let hx = x0; hx < x1; hx += 6) ctx.fillRect(hx, 0, 2, H);
    }
    // threshold mark: a tick at the threshold's height, the bar of p beside it
    ctx.fillStyle = "#e3b341"; ctx.fillRect(x1 - 6, H - f.threshold * H, 5, 1);
    if (f.probability !== null) { ctx.fillStyle = "#d8dee6"; ctx.fillRect(x1 - 4, H - f.probability * H, 2, f.probability * H); }
  }
  // the signal: a break wherever slots are missing for more than 3 display periods (a gap)
  let lo = Infinity, hi = -Infinity;
  for (const v of b.values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  const span = Math.max(hi - lo, 0.5), y = v => H - 4 - (v - lo) / span * (H - 8);
  ctx.strokeStyle = "#7ee787"; ctx.lineWidth = 1; ctx.beginPath();
  for (let i = 0; i < b.slots.length; i++) {
    const gap = i === 0 || b.slots[i] - b.slots[i - 1] > 3;
    const px = x(b.slots[i] * slotNs);
    if (gap) ctx.moveTo(px, y(b.values[i])); else ctx.lineTo(px, y(b.values[i]));
  }
  ctx.stroke();
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function card(pid) {
  let c = cards.get(pid);
  if (!c) {
    c = el("div", "bed");
    c.dataset.bed = pid;
    const top = el("div", "top");
    top.append(el("span", "pid", pid), el("span", "episode"));
    const canvas = el("canvas"); canvas.width = 640; canvas.height = 70;
    c.append(top, canvas, el("div", "latest"));
    c.addEventListener("click", async () => {
      selected = pid;
      try {
        const r = await fetch(`api/bed/${encodeURIComponent(pid)}`);  // the bed's last hour of flags
        if (r.ok && beds.has(pid)) addFlags(beds.get(pid), (await r.json()).flags);
      } catch (e) { console.error("bed history", e); }
      renderDetail();
    });
    cards.set(pid, c);
    document.getElementById("ward").appendChild(c);
  }
  return c;
}

function renderBed(pid) {
  const b = beds.get(pid), c = card(pid);
  c.classList.toggle("in-artifact", inArtifact(b));
  const ep = c.querySelector(".episode");
  if (b.episode && b.episode.state === "open") {
    ep.className = "episode open"; ep.textContent = `suppression ON since ${hhmmss(b.episode.start_ns)}`;
  } else if (b.episode && b.episode.state === "lapsed") {
    ep.className = "episode lapsed"; ep.textContent = "suppression lapsed: feed silent, alarms not suppressed";
  } else if (b.episode) {
    ep.className = "episode closed"; ep.textContent = `suppression off (${b.episode.reason || "closed"})`;
  } else { ep.className = "episode"; ep.textContent = ""; }
  const f = latestFlag(b), latest = c.querySelector(".latest");
  if (f) {
    const cls = f.status !== "scored" ? "flag-none" : (f.artifact ? "flag-artifact" : "flag-clean");
    const what = f.status !== "scored" ? `no score (${f.reason})` : `${f.artifact ? "ARTIFACT" : "clean"} p=${f.probability.toFixed(3)}`;
    const lat = `latency ${b.latency_ms === null ? "?" : Math.round(b.latency_ms)} ms`;
    latest.replaceChildren(el("span", cls, `${hhmmss(f.window_start_ns)} ${what}`), " ", el("span", "muted", lat));
    latest.dataset.status = f.status; latest.dataset.artifact = String(f.artifact);
  }
  drawStrip(c.querySelector("canvas"), b);
}

function markBroken(pid, e) {
  // the bed stays on the page, saying it cannot be drawn; the rest of the ward goes on
  if (!broken.has(pid)) console.error("bed", pid, e);
  broken.add(pid);
  try {
    const c = card(pid);
    c.classList.add("bad");
    c.querySelector(".latest").replaceChildren(el("span", "flag-none", "this bed's data could not be drawn"));
    delete c.querySelector(".latest").dataset.status;
  } catch (e2) { /* nothing more this bed can show */ }
}

function renderDetail() {
  const box = document.getElementById("detail");
  if (selected === null || !beds.has(selected)) { box.style.display = "none"; return; }
  const b = beds.get(selected);
  box.style.display = "block";
  document.getElementById("d-title").textContent = `${selected}: last ${stripS} s and last hour of flags`;
  drawStrip(document.getElementById("d-strip"), b);
  const c = document.getElementById("history"), ctx = c.getContext("2d"), W = c.width, H = c.height;
  ctx.clearRect(0, 0, W, H);
  const n = 360, w = W / n, start = b.flags.length - Math.min(b.flags.length, n);
  b.flags.slice(start).forEach((f, i) => {
    ctx.fillStyle = f.status !== "scored" ? "#3a4756" : (f.artifact ? "#ff7b72" : "#7ee787");
    const h = f.status !== "scored" ? H : Math.max(f.probability * H, 1);
    ctx.fillRect(i * w, H - h, Math.max(w - 1, 1), h);
  });
  const thr = latestFlag(b) ? latestFlag(b).threshold : null;
  if (thr !== null) { ctx.fillStyle = "#e3b341"; ctx.fillRect(0, H - thr * H, W, 1); }
  const rows = b.flags.slice(-30).reverse().map(f => {
    const tr = el("tr");
    tr.append(el("td", null, hhmmss(f.window_start_ns)),
              el("td", null, f.status === "scored" ? (f.artifact ? "artifact" : "clean") : String(f.reason)),
              el("td", null, f.probability === null ? "" : f.probability.toFixed(3)),
              el("td", null, String(Math.round(f.latency_ms))));
    return tr;
  });
  document.getElementById("d-flags").replaceChildren(...rows);
}

function render() {
  // at most once per animation frame, only beds that changed; order: beds in artifact first
  try {
    const drawn = dirty.size || forgotten;
    forgotten = false;
    for (const pid of dirty) {
      try { renderBed(pid); broken.delete(pid); cards.get(pid).classList.remove("bad"); } catch (e) { markBroken(pid, e); }
    }
    if (drawn) {
      const order = [...beds.keys()].sort((a, b) => rank(beds.get(b)) - rank(beds.get(a)) || a.localeCompare(b));
      const ward = document.getElementById("ward");
      order.forEach((pid, i) => { const c = card(pid); if (ward.children[i] !== c) ward.insertBefore(c, ward.children[i]); });
      const artifact = order.filter(inArtifactSafe).length;
      document.getElementById("counts").textContent =
        `${beds.size} beds, ${artifact} in artifact` + (skipped ? `; ${skipped} unreadable records skipped` : "");
      if (selected !== null && dirty.has(selected)) {
        try { renderDetail(); } catch (e) { console.error("detail", e); }
      }
    }
    dirty.clear();
    if (model) document.getElementById("model").textContent = `model: ${model}`;
    lastFrameAt = Date.now();
    const live = document.getElementById("live");
    if (connected && pending !== null) {  // the update is on the page now: say so
      live.textContent = pending + (broken.size ? ` (${broken.size} bed${broken.size > 1 ? "s" : ""} not drawn)` : "");
      live.className = "muted";
      pending = null;
    }
  } catch (e) {
    console.error("render", e);
  } finally {
    requestAnimationFrame(render);
  }
}

function inArtifactSafe(pid) { try { return inArtifact(beds.get(pid)); } catch (e) { return false; } }

// A bed the server no longer holds leaves the page: its last state (an open suppression, say) would
// otherwise stay on screen for ever, with nothing left to lapse it.
function forget(pid) {
  beds.delete(pid); broken.delete(pid); dirty.delete(pid);
  const c = cards.get(pid);
  if (c) c.remove();
  cards.delete(pid);
  forgotten = true;
  if (selected === pid) { selected = null; renderDetail(); }
}

// whole: a snapshot, every bed the server holds (the others are forgotten); else a delta, whose `gone`
// names the beds the server dropped
function apply(msg, whole) {
  if (typeof msg.model === "string") model = msg.model;
  if (typeof msg.strip_s === "number") stripS = msg.strip_s;
  if (typeof msg.slot_ns === "number") slotNs = msg.slot_ns;
  if (typeof msg.skipped === "number") skipped = msg.skipped;
  const held = (msg.beds && typeof msg.beds === "object") ? msg.beds : {};
  if (whole) {
    for (const pid of [...beds.keys()]) if (!Object.prototype.hasOwnProperty.call(held, pid)) forget(pid);
  } else if (Array.isArray(msg.gone)) {
    for (const pid of msg.gone) if (typeof pid === "string" && beds.has(pid)) forget(pid);
  }
  for (const [pid, d] of Object.entries(held)) {
    try { merge(pid, d); } catch (e) { dirty.add(pid); markBroken(pid, e); }
  }
}

function connect() {
  const es = new EventSource("events");
  const live = document.getElementById("live");
  es.addEventListener("snapshot", e => { connected = true; apply(JSON.parse(e.data), true); pending = "live"; });
  es.addEventListener("delta", e => { apply(JSON.parse(e.data), false); pending = `live, updated ${clock()}`; });
  es.addEventListener("reload", () => { es.close(); connect(); });
  es.onerror = () => { connected = false; live.textContent = "reconnecting"; live.className = "muted"; };
}

// The drawing loop's watchdog: a visible page whose frames stopped is not live, whatever the stream does.
setInterval(() => {
  if (document.visibilityState === "visible" && Date.now() - lastFrameAt > 3000) {
    const live = document.getElementById("live");
    live.textContent = "stalled: the page stopped drawing (reload it)"; live.className = "stalled";
  }
}, 1000);
document.getElementById("d-close").addEventListener("click", e => { e.stopPropagation(); selected = null; renderDetail(); });
connect();
requestAnimationFrame(render);
