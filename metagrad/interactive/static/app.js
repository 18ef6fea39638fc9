// metagrad interactive dashboard: REST for state and commands, a WebSocket for the live event stream.
"use strict";
// The printed link carries ?token=; the server answered it with an HttpOnly session cookie, so the page drops
// the token from its URL (and the browser's history) and every call below rides on the cookie.
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
const COLORS = ["#1a56db", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#e67700"];
const state = { metrics: [], evals: [], branches: new Map(), run: null, hyper: {}, lastSeq: 0, drawQueued: false };

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

// the server's rule for a branch name (load_checkpoint's branch_name)
const BRANCH_NAME = /^[A-Za-z0-9_. -]{1,64}$/;

function loadCheckpoint(id) {
  const name = document.getElementById("branch-name-" + id).value.trim();
  if (name && !BRANCH_NAME.test(name)) {
    noteCommand({ id: "–", command: "load_checkpoint", status: "failed",
                  reason: "a branch name has at most 64 letters, digits, spaces or _ . -" });
    return;
  }
  send(name ? { command: "load_checkpoint", checkpoint: id, branch_name: name }
            : { command: "load_checkpoint", checkpoint: id });
}

// rows are kept across refreshes (keyed by checkpoint id) so that a branch name being typed survives them
const ckptRows = new Map();
function checkpointRow(c) {
  const tr = document.createElement("tr");
  for (let i = 0; i < 3; i++) tr.append(document.createElement("td"));
  const td = document.createElement("td");
  const input = document.createElement("input");
  input.id = "branch-name-" + c.id; input.placeholder = "branch name"; input.maxLength = 64; input.size = 12;
  const b = document.createElement("button"); b.textContent = "Load"; b.id = "load-" + c.id;
  b.onclick = () => loadCheckpoint(c.id);
  td.append(input, " ", b); tr.append(td);
  return tr;
}

function renderCheckpoints(ckpts) {
  const tbody = document.querySelector("#ckpt-table tbody");
  const seen = new Set();
  for (const c of ckpts) {
    seen.add(c.id);
    if (!ckptRows.has(c.id)) ckptRows.set(c.id, checkpointRow(c));
    const tr = ckptRows.get(c.id);
    [c.id, c.step, c.branch].forEach((v, i) => { tr.children[i].textContent = v; });
    tbody.append(tr);  // appending an attached row moves it: the table follows the server's order
  }
  for (const [id, tr] of ckptRows) if (!seen.has(id)) { tr.remove(); ckptRows.delete(id); }
}

function branchText(b) {
  const own = b.name ? `${b.name} (branch ${b.id})` : `branch ${b.id}`;
  if (b.parent === null) return own;
  return `${own} ← ${b.checkpoint} (step ${b.fork_step} of ${branchLabel(b.parent)})`;
}

function renderBranches(branches) {
  const current = state.run ? state.run.branch : 0;
  const children = new Map();
  for (const b of branches) {
    const k = b.parent === null ? "root" : b.parent;
    if (!children.has(k)) children.set(k, []);
    children.get(k).push(b);
  }
  function render(b) {
    const li = document.createElement("li");
    const span = document.createElement("span");
    span.className = "branch" + (b.id === current ? " current" : "");
    span.dataset.branch = b.id; span.id = "branch-" + b.id;
    span.textContent = branchText(b);
    span.style.color = branchColor(b.id);
    li.append(span);
    const kids = children.get(b.id) || [];
    if (kids.length) { const ul = document.createElement("ul"); for (const k of kids) ul.append(render(k)); li.append(ul); }
    return li;
  }
  const root = document.createElement("ul");
  for (const b of children.get("root") || []) root.append(render(b));
  const tree = document.getElementById("branch-tree"); tree.innerHTML = ""; tree.append(root);
}

async function refreshCheckpoints() {
  const [ckpts, branches] = await Promise.all([api("/api/checkpoints"), api("/api/branches")]);
  state.branches = new Map(branches.map(b => [b.id, b]));
  renderCheckpoints(ckpts);
  renderBranches(branches);
  queueDraw();  // the charts' legends name the branches
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

// ---- charts (uPlot) ----
// uPlot wants every series on one shared x: x is the sorted union of the steps of a chart's tracks, a step a
// track has no point at is `undefined` (uPlot draws across it) and a non-finite value is `null` (a gap).
window.charts = {};
const zoom = {};  // chart name -> {min, max} of a drag-zoom on x, kept across data updates; null: whole run

function branchLabel(id) {
  const b = state.branches.get(id);
  return b && b.name ? b.name : `branch ${id}`;
}
function branchColor(id) { return COLORS[id % COLORS.length]; }

function finite(v, log) { return v == null || !Number.isFinite(v) || (log && v <= 0) ? null : v; }

// rows -> Map(branch -> Map(step -> value)), the branches in id order
function byBranch(rows, key, log) {
  const m = new Map();
  for (const r of rows) {
    if (!m.has(r.branch)) m.set(r.branch, new Map());
    m.get(r.branch).set(r.step, finite(r[key], log));
  }
  return new Map([...m.entries()].sort((a, b) => a[0] - b[0]));
}

// an exponential moving average that skips gaps (a gap stays a gap)
function smooth(values, k) {
  const out = new Map(); let acc = null;
  for (const [x, y] of values) {
    if (y !== null) acc = acc === null ? y : acc + (y - acc) / k;
    out.set(x, y === null ? null : acc);
  }
  return out;
}

function tracksOf(rows, key, { log = false, kind = "line", suffix = "", smoothK = 0 } = {}) {
  return [...byBranch(rows, key, log)].map(([b, values]) => ({
    label: branchLabel(b) + suffix, color: branchColor(b), kind,
    values: smoothK ? smooth(values, smoothK) : values }));
}

// `extra`: more steps for x, so that a sparse chart (validation accuracy) spans the same steps as the others
function align(tracks, extra = []) {
  const steps = new Set(extra);
  for (const t of tracks) for (const s of t.values.keys()) steps.add(s);
  const xs = Float64Array.from(steps).sort();
  const index = new Map(); xs.forEach((s, i) => index.set(s, i));
  const ys = tracks.map(t => {
    const y = new Array(xs.length).fill(undefined);
    for (const [s, v] of t.values) y[index.get(s)] = v;
    return y;
  });
  return [Array.from(xs), ...ys];
}

function tick(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-2 || a >= 1e4) ? v.toExponential(0) : String(+v.toPrecision(3));
}

// log axes: decades only (with 2 and 5 between them over a short range), not uPlot's every 1..9 x 10^k
function logSplits(u, axisIdx, min, max) {
  if (!(min > 0 && max >= min && Number.isFinite(max))) return [];  // no data yet
  const lo = Math.floor(Math.log10(min)), hi = Math.ceil(Math.log10(max));
  const mantissas = hi - lo <= 2 ? [1, 2, 5] : [1];
  const out = [];
  for (let e = lo; e <= hi; e++) {
    for (const m of mantissas) { const v = +(m * 10 ** e).toPrecision(12); if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) out.push(v); }
  }
  return out;
}

// which log-axis ticks get a label: decades first, then 2s and 5s, each at least 22 px from those labelled
function logLabels(u, splits) {
  const pos = splits.map(v => u.valToPos(v, "y"));
  const isDecade = v => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9;
  const kept = [];
  const fits = i => kept.every(j => Math.abs(pos[i] - pos[j]) >= 22);
  for (const decades of [true, false]) {
    splits.forEach((v, i) => { if (isDecade(v) === decades && fits(i)) kept.push(i); });
  }
  return splits.map((v, i) => kept.includes(i) ? v : null);
}

function lastValue(ys) {
  for (let i = ys.length - 1; i >= 0; i--) if (ys[i] != null) return ys[i];
  return null;
}

// the legend shows the hovered step's values (– for a branch with no point near it), and each series'
// latest value while the cursor is off the chart
const hovering = u => u.cursor.left >= 0;
function legendValue(u, v, si, idx) { return idx != null ? fmt(v) : hovering(u) ? "–" : fmt(lastValue(u.data[si])); }
function stepValue(u, v, si, idx) { return idx != null ? String(v) : hovering(u) ? "–" : "latest"; }

function seriesOpts(t) {
  const common = { label: t.label, stroke: t.color, value: legendValue };
  if (t.kind === "points") return { ...common, paths: () => null, points: { show: true, size: 7, fill: t.color } };
  if (t.kind === "linepoints") return { ...common, width: 1.5, points: { show: true, size: 5, fill: t.color } };
  return { ...common, width: 1.5, points: { show: false } };
}

const CHARTS = {
  loss: { el: "loss-chart", height: 260, log: () => document.getElementById("loss-log").checked,
          tracks: log => tracksOf(state.metrics, "train_loss", { log, smoothK: 5, suffix: " train" })
            .concat(tracksOf(state.evals, "val_loss", { log, kind: "points", suffix: " val" })) },
  lr: { el: "lr-chart", height: 160, log: () => true, tracks: log => tracksOf(state.metrics, "lr", { log }) },
  grad: { el: "grad-chart", height: 160, log: () => true,
          tracks: log => tracksOf(state.metrics, "grad_norm", { log }) },
  acc: { el: "acc-chart", height: 160, log: () => false, range: [0, 1], allSteps: true,
         tracks: () => tracksOf(state.evals, "val_accuracy", { kind: "linepoints" }) },
};

function noteZoom(name, u) {
  const xs = u.data[0], sc = u.scales.x;
  if (!xs.length || sc.min == null) return;
  const whole = sc.min <= xs[0] + 1e-9 && sc.max >= xs[xs.length - 1] - 1e-9;
  zoom[name] = whole ? null : { min: sc.min, max: sc.max };
}

const GRID = { stroke: "#e6e9ef", width: 1 };

function makeChart(name, spec, tracks, log, data) {
  const el = document.getElementById(spec.el);
  const opts = {
    width: Math.max(300, el.clientWidth), height: spec.height,
    // hovering one chart shows the same step on the others; a branch's value is shown only within 30 px of
    // the cursor (uPlot's default is the nearest point however far: another branch's distant fork)
    cursor: { sync: { key: "metagrad-steps" }, hover: { prox: 30 } },
    scales: { x: { time: false }, y: log ? { distr: 3 } : spec.range ? { range: spec.range } : {} },
    axes: [{ label: "step", labelSize: 20, grid: GRID },
           { size: 56, grid: GRID, values: (u, splits) => splits.map(tick),
             ...(log ? { splits: logSplits, filter: logLabels } : {}) }],
    series: [{ label: "step", value: stepValue }, ...tracks.map(seriesOpts)],
    hooks: { setScale: [(u, key) => { if (key === "x") noteZoom(name, u); }] },
  };
  const keep = zoom[name];
  el.innerHTML = "";
  const u = new uPlot(opts, data, el);
  if (keep) u.setScale("x", keep);
  return u;
}

function drawChart(name, spec) {
  const log = spec.log();
  const tracks = spec.tracks(log);
  const data = align(tracks, spec.allSteps ? state.metrics.map(m => m.step) : []);
  // a new branch, a branch's new name or the log toggle change the series or the scale: build the chart anew
  const shape = JSON.stringify([log, tracks.map(t => [t.label, t.color, t.kind])]);
  let u = window.charts[name];
  if (!u || u.metagradShape !== shape) {
    if (u) u.destroy();
    u = window.charts[name] = makeChart(name, spec, tracks, log, data);
    u.metagradShape = shape;
  } else if (zoom[name]) {
    u.setData(data, false);
    u.setScale("x", zoom[name]);
  } else {
    u.setData(data);
  }
}

function draw() {
  state.drawQueued = false;
  for (const [name, spec] of Object.entries(CHARTS)) drawChart(name, spec);
}

function resizeCharts() {
  for (const [name, spec] of Object.entries(CHARTS)) {
    const u = window.charts[name], el = document.getElementById(spec.el);
    if (u) u.setSize({ width: Math.max(300, el.clientWidth), height: spec.height });
  }
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
  document.getElementById("loss-log").addEventListener("change", queueDraw);
  window.addEventListener("resize", resizeCharts);
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
