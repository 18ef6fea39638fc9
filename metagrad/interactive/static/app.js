// metagrad interactive dashboard: REST for state and commands, a WebSocket for the live event stream.
"use strict";
// The printed link carries ?token=; the server answered it with an HttpOnly session cookie, so the page drops
// the token from its URL (and the browser's history) and every call below rides on the cookie.
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
const COLORS = ["#1a56db", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#e67700"];
const state = { metrics: [], evals: [], run: null, hyper: {}, lastSeq: 0, drawQueued: false };

class ApiError extends Error { constructor(status, message) { super(message); this.status = status; } }

async function api(path, options = {}) {
  const res = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new ApiError(res.status, typeof body.detail === "string" ? body.detail : res.status + " " + JSON.stringify(body));
  return body;
}

async function send(command) {
  try {
    const rec = await api("/api/commands", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(command) });
    noteCommand(rec);
    return rec;
  } catch (err) {
    noteCommand({ id: "–", command: command.command, status: "failed", reason: err.message });
    return null;
  }
}

const commandItems = new Map();
// requested -> running -> succeeded | failed: a record never moves back (the POST's 202 "requested" can arrive
// after the WebSocket's "succeeded")
const STATUS_RANK = { requested: 0, running: 1, succeeded: 2, failed: 2 };
function noteCommand(rec) {
  const list = document.getElementById("command-list");
  let li = commandItems.get(rec.id);
  if (li && rec.id !== "–" && (STATUS_RANK[li.dataset.status] ?? 0) > (STATUS_RANK[rec.status] ?? 0)) return;
  if (!li || rec.id === "–") { li = document.createElement("li"); list.prepend(li); if (rec.id !== "–") commandItems.set(rec.id, li); }
  const cls = rec.status === "succeeded" ? "ok" : rec.status === "failed" ? "failed" : "pending";
  li.className = cls;
  li.dataset.command = rec.command; li.dataset.status = rec.status;
  li.textContent = `${rec.id} ${rec.command}: ${rec.status}` + (rec.step != null ? ` @ step ${rec.step}` : "") +
                   (rec.reason ? ` — ${rec.reason}` : "");
  while (list.children.length > 40) list.removeChild(list.lastChild);
  if (rec.command === "suggest_lr" && rec.status === "succeeded") showSuggestion(rec.result);
  if (rec.status === "succeeded" || rec.status === "failed") refreshAll();
}

function showSuggestion(r) {
  const el = document.getElementById("suggest-result");
  el.innerHTML = "";
  const p = document.createElement("div");
  p.id = "suggest-text";
  p.textContent = `d val_loss / d LR = ${fmt(r.dval_dlr)} over the next ${r.window} steps ` +
    `→ ${r.direction} the LR: ${fmt(r.lr)} → ${fmt(r.suggested_lr)} (×${fmt(r.factor)}); ` +
    `val loss after the window ${fmt(r.val_loss)} → ${fmt(r.val_loss_at_suggested)} at the suggestion.`;
  const b = document.createElement("button");
  b.id = "btn-apply-suggestion"; b.textContent = "Apply suggested LR";
  b.onclick = () => send({ command: "set_hyperparams", values: { learning_rate: r.suggested_lr } });
  el.append(p, b);
}

function fmt(x) { return x == null || !Number.isFinite(x) ? "–" : (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e4 ? x.toExponential(3) : x.toPrecision(4)); }

async function refreshRun() {
  const run = await api("/api/run");
  state.run = run;
  document.getElementById("run-step").textContent = run.step;
  document.getElementById("run-total").textContent = run.num_steps;
  document.getElementById("run-branch").textContent = run.branch;
  document.getElementById("run-status").textContent = run.status;
  document.getElementById("run-lr").textContent = fmt(run.hyperparams.learning_rate);
  document.getElementById("run-val").textContent = run.last_eval ? fmt(run.last_eval.val_loss) : "–";
  document.getElementById("run-message").textContent = run.message || "";
  const box = document.getElementById("hyperparams");
  for (const [name, value] of Object.entries(run.hyperparams)) {
    let row = document.getElementById("hp-row-" + name);
    if (!row) {
      row = document.createElement("div"); row.className = "hp-row"; row.id = "hp-row-" + name;
      const label = document.createElement("label"); label.textContent = name;
      const cur = document.createElement("span"); cur.id = "hp-current-" + name; cur.className = "small";
      const input = document.createElement("input"); input.id = "hp-" + name; input.type = "text"; input.size = 10;
      const btn = document.createElement("button"); btn.id = "set-" + name; btn.textContent = "Set";
      btn.onclick = () => {
        const v = Number(input.value);
        if (input.value.trim() === "" || !Number.isFinite(v)) { noteCommand({ id: "–", command: "set_hyperparams", status: "failed", reason: `${name} must be a number` }); return; }
        send({ command: "set_hyperparams", values: { [name]: v } });
      };
      row.append(label, input, btn, document.createTextNode(" now "), cur);
      box.append(row);
    }
    document.getElementById("hp-current-" + name).textContent = fmt(value);
  }
}

async function refreshCheckpoints() {
  const [ckpts, branches] = await Promise.all([api("/api/checkpoints"), api("/api/branches")]);
  const tbody = document.querySelector("#ckpt-table tbody");
  tbody.innerHTML = "";
  for (const c of ckpts) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${c.id}</td><td>${c.step}</td><td>${c.branch}</td>`;
    const td = document.createElement("td");
    const b = document.createElement("button"); b.textContent = "Load"; b.id = "load-" + c.id;
    b.onclick = () => send({ command: "load_checkpoint", checkpoint: c.id });
    td.append(b); tr.append(td); tbody.append(tr);
  }
  const current = state.run ? state.run.branch : 0;
  const children = new Map();
  for (const b of branches) { const k = b.parent === null ? "root" : b.parent; if (!children.has(k)) children.set(k, []); children.get(k).push(b); }
  function render(b) {
    const li = document.createElement("li");
    const span = document.createElement("span");
    span.className = "branch" + (b.id === current ? " current" : "");
    span.dataset.branch = b.id; span.id = "branch-" + b.id;
    span.textContent = b.parent === null ? `branch ${b.id} (main)` : `branch ${b.id} ← ${b.checkpoint} (step ${b.fork_step} of branch ${b.parent})`;
    span.style.color = COLORS[b.id % COLORS.length];
    li.append(span);
    const kids = children.get(b.id) || [];
    if (kids.length) { const ul = document.createElement("ul"); for (const k of kids) ul.append(render(k)); li.append(ul); }
    return li;
  }
  const root = document.createElement("ul");
  for (const b of children.get("root") || []) root.append(render(b));
  const tree = document.getElementById("branch-tree"); tree.innerHTML = ""; tree.append(root);
}

async function refreshLog() {
  const rows = await api("/api/log?limit=500");
  const tbody = document.querySelector("#log-table tbody");
  tbody.innerHTML = "";
  for (const r of rows.slice().reverse()) {
    const tr = document.createElement("tr");
    const args = JSON.stringify(r.args);
    tr.innerHTML = `<td>${r.seq}</td><td>${r.step}</td><td>${r.branch}</td><td>${r.command}</td>`;
    const td = document.createElement("td"); td.textContent = args.length > 80 ? args.slice(0, 77) + "..." : args;
    tr.append(td); tbody.append(tr);
  }
}

async function refreshModelData() {
  const [model, data] = await Promise.all([api("/api/model"), api("/api/dataset")]);
  const sel = document.getElementById("layer-select");
  const chosen = sel.value;
  sel.innerHTML = "";
  for (const l of model.layers) { const o = document.createElement("option"); o.value = l.name; o.textContent = l.name; sel.append(o); }
  if (chosen) sel.value = chosen;
  document.getElementById("layer-info").textContent =
    model.layers.map(l => `${l.name}: ${l.size} params${l.frozen ? " (frozen)" : ""}`).join(" · ");
  document.getElementById("data-info").textContent =
    `${data.name}: ${data.num_train} training examples, input ${JSON.stringify(data.input_shape)}, ${data.num_classes} classes; ` +
    `sources ${data.sources.map(s => s.name + "=" + s.count).join(", ")}; mixture ${data.mixture ? JSON.stringify(data.mixture) : "natural"}`;
}

let refreshing = null;
function refreshAll() {
  if (refreshing) return refreshing;
  refreshing = Promise.all([refreshRun(), refreshCheckpoints(), refreshLog(), refreshModelData()])
    .catch(err => console.error(err)).finally(() => { refreshing = null; });
  return refreshing;
}

function drawLines(canvas, series, { log = false, dots = [] } = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 52, R = 8, T = 8, B = 22;
  ctx.clearRect(0, 0, W, H);
  const all = series.flatMap(s => s.points).concat(dots.flatMap(s => s.points));
  if (!all.length) return;
  const tf = v => log ? Math.log10(Math.max(v, 1e-12)) : v;
  const xs = all.map(p => p[0]), ys = all.map(p => tf(p[1])).filter(Number.isFinite);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys); if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (tf(y) - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#ccd"; ctx.fillStyle = "#556"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, py = T + (1 - i / 4) * (H - T - B);
    ctx.beginPath(); ctx.moveTo(L, py); ctx.lineTo(W - R, py); ctx.stroke();
    ctx.fillText(fmt(log ? Math.pow(10, yv) : yv), 2, py + 4);
  }
  ctx.fillText(String(x0), L, H - 6); ctx.fillText(String(x1), W - R - 30, H - 6);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.3; ctx.beginPath();
    s.points.forEach((p, i) => { const px = X(p[0]), py = Y(p[1]); i ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
    ctx.stroke();
  }
  for (const s of dots) {
    ctx.fillStyle = s.color;
    for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI); ctx.fill(); }
  }
}

function byBranch(rows, key) {
  const m = new Map();
  for (const r of rows) { if (!m.has(r.branch)) m.set(r.branch, []); m.get(r.branch).push([r.step, r[key]]); }
  return [...m.entries()].map(([b, points]) => ({ color: COLORS[b % COLORS.length], points }));
}

function smooth(points, k) {
  if (points.length < 3) return points;
  const out = []; let acc = null;
  for (const [x, y] of points) { acc = acc === null ? y : acc + (y - acc) / k; out.push([x, acc]); }
  return out;
}

function draw() {
  state.drawQueued = false;
  const loss = byBranch(state.metrics, "train_loss").map(s => ({ color: s.color, points: smooth(s.points, 5) }));
  drawLines(document.getElementById("loss-chart"), loss, { dots: byBranch(state.evals, "val_loss") });
  drawLines(document.getElementById("lr-chart"), byBranch(state.metrics, "lr"), { log: true });
}
function queueDraw() { if (!state.drawQueued) { state.drawQueued = true; requestAnimationFrame(draw); } }

function handle(ev) {
  state.lastSeq = Math.max(state.lastSeq, ev.seq || 0);
  if (ev.type === "metrics") {
    if (state.metrics.slice(-50).some(m => m.step === ev.step && m.branch === ev.branch)) return;
    state.metrics.push(ev); if (state.metrics.length > 20000) state.metrics.splice(0, 5000);
    document.getElementById("run-step").textContent = ev.step + 1;
    document.getElementById("run-lr").textContent = fmt(ev.lr);
    queueDraw();
  } else if (ev.type === "eval") { state.evals.push(ev); queueDraw(); document.getElementById("run-val").textContent = fmt(ev.val_loss); }
  else if (ev.type === "command") { noteCommand(ev.record); }
  else if (ev.type === "status" || ev.type === "branch" || ev.type === "checkpoint") { refreshAll(); }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws?since=${state.lastSeq}`);
  const label = document.getElementById("ws-state");
  ws.onopen = () => { label.textContent = "ws: live"; };
  ws.onclose = () => { label.textContent = "ws: reconnecting"; setTimeout(connect, 1000); };
  ws.onmessage = (msg) => {
    const data = JSON.parse(msg.data);
    if (data.type === "events") data.events.forEach(handle);
  };
}

function layerCommand(kind, extra) {
  const layer = document.getElementById("layer-select").value;
  if (layer) send(Object.assign({ command: kind, layer }, extra));
}

function wire() {
  const on = (id, fn) => document.getElementById(id).addEventListener("click", fn);
  on("btn-pause", () => send({ command: "pause" }));
  on("btn-resume", () => send({ command: "resume" }));
  on("btn-stop", () => { if (confirm("Stop the run? It cannot be resumed.")) send({ command: "stop" }); });
  on("btn-evaluate", () => send({ command: "evaluate" }));
  on("btn-lr-half", () => state.run && send({ command: "set_hyperparams", values: { learning_rate: state.run.hyperparams.learning_rate / 2 } }));
  on("btn-lr-double", () => state.run && send({ command: "set_hyperparams", values: { learning_rate: state.run.hyperparams.learning_rate * 2 } }));
  on("btn-suggest", () => { document.getElementById("suggest-result").textContent = "computing the metagradient…";
    send({ command: "suggest_lr", window: Number(document.getElementById("suggest-window").value) || 50 }); });
  on("btn-save", () => { const name = document.getElementById("ckpt-name").value.trim();
    send(name ? { command: "save_checkpoint", name } : { command: "save_checkpoint" }); });
  on("btn-reset-layer", () => layerCommand("reset_layer", {}));
  on("btn-freeze", () => layerCommand("freeze_layer", { frozen: true }));
  on("btn-unfreeze", () => layerCommand("freeze_layer", { frozen: false }));
  on("btn-append", () => {
    let body; try { body = JSON.parse(document.getElementById("append-json").value); }
    catch (e) { noteCommand({ id: "–", command: "append_data", status: "failed", reason: "not JSON: " + e.message }); return; }
    send(Object.assign({ command: "append_data" }, body));
  });
  on("btn-mixture", () => {
    let weights; try { weights = JSON.parse(document.getElementById("mixture-json").value); }
    catch (e) { noteCommand({ id: "–", command: "set_mixture", status: "failed", reason: "not JSON: " + e.message }); return; }
    send({ command: "set_mixture", weights });
  });
}

async function main() {
  wire();
  let run;
  for (;;) {
    try { run = await api("/api/run"); break; }
    catch (err) {
      if (err.status === 401) {
        document.getElementById("run-status").textContent = "unauthorized: open the URL printed by the server (it carries ?token=)";
        return;
      }
      document.getElementById("run-status").textContent = "server unreachable, retrying: " + err.message;
      await new Promise(r => setTimeout(r, 1000));
    }
  }
  state.lastSeq = run.event_seq;
  const hist = await api("/api/metrics?limit=20000");
  state.metrics = hist.metrics; state.evals = hist.evals;
  await refreshAll();
  queueDraw();
  connect();
  setInterval(refreshRun, 1000);
}
main();
