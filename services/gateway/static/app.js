"use strict";
// imagemesh web page: one or several images, the steps, each image run as a job over
// /v1/jobs (two at a time) with its progress events, results compared before/after
// (zoom and pan shared by both sides), downloaded one by one or as a zip.

const $ = (id) => document.getElementById(id);
const JOBS_AT_ONCE = 2;
const PHONE = window.matchMedia("(max-width: 820px)");
let items = [];            // {file, url, width, height, status, fraction, eta, blob, resultUrl, outWidth, outHeight, steps, el}
let effects = [];          // from GET /v1/effects
let shown = null;          // the item in the before/after view
let running = false;

function headers(extra = {}) {
  const token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text;
  select.appendChild(o);
}

const human = (name) => name.replace(/[_-]+/g, " ").replace(/^./, (c) => c.toUpperCase());
const bytes = (n) => n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(2)} MB`;
const dims = (w, h) => `${w} × ${h}`;
const escape = (text) => String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

async function load() {
  const info = await (await fetch("/", { headers: { Accept: "application/json" } })).json();
  $("auth").hidden = !info.auth_required;
  const models = await (await fetch("/v1/models")).json();
  option($("up-model"), "auto", `auto (${models.defaults.upscaler})`);
  option($("bg-model"), "auto", `auto (${models.defaults.bgremoval})`);
  for (const m of models.models.filter((m) => m.ready)) {
    if (m.service === "upscaler") option($("up-model"), m.name, m.name);
    if (m.service === "bgremoval") {
      option($("bg-model"), m.name, m.name);
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" value="${escape(m.name)}" class="compare-model"> ${escape(m.name)}`;
      $("bg-compare").appendChild(label);
    }
  }
  effects = (await (await fetch("/v1/effects")).json()).effects;
  for (const e of effects) option($("effect"), e.name, human(e.name));
  renderEffectParams();
}

// Each parameter a labelled slider over its range, its value beside it.
function renderEffectParams() {
  const effect = effects.find((e) => e.name === $("effect").value);
  const box = $("effect-params");
  box.innerHTML = "";
  $("effect-description").textContent = effect ? effect.description : "";
  if (!effect) return;
  for (const p of effect.params) {
    const label = document.createElement("label");
    label.className = "field param";
    const step = p.integer ? 1 : Number(((p.maximum - p.minimum) / 100).toPrecision(2));
    label.innerHTML = `<span>${escape(human(p.name))}</span>
      <input type="range" data-param="${escape(p.name)}" min="${p.minimum}" max="${p.maximum}" step="${step}"
        value="${p.default}"><output>${p.default}</output>
      <small>${escape(p.description)} (${p.minimum} to ${p.maximum})</small>`;
    const input = label.querySelector("input");
    input.addEventListener("input", () => { label.querySelector("output").textContent = input.value; });
    box.appendChild(label);
  }
  for (const c of effect.options) {
    const label = document.createElement("label");
    label.className = "field";
    label.title = c.description;
    const select = document.createElement("select");
    select.dataset.option = c.name;
    for (const v of c.values) option(select, v, human(v));
    select.value = c.default;
    label.append(human(c.name), select);
    box.appendChild(label);
  }
}

function steps() {
  const list = [];
  if ($("use-bg").checked) {
    list.push({ op: "remove_background", model: $("bg-model").value, refine: $("bg-refine").checked });
  }
  if ($("use-upscale").checked) list.push({ op: "upscale", scale: Number($("scale").value), model: $("up-model").value });
  if ($("use-effect").checked) {
    const params = {};
    for (const input of $("effect-params").querySelectorAll("[data-param]")) params[input.dataset.param] = Number(input.value);
    for (const select of $("effect-params").querySelectorAll("[data-option]")) params[select.dataset.option] = select.value;
    list.push({ op: "effect", effect: $("effect").value, params });
  }
  return list;
}

// What the steps make of a width and height: only upscaling changes the size (rounded as the service rounds).
function outputSize(width, height) {
  if (!$("use-upscale").checked) return [width, height];
  const scale = Number($("scale").value);
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

function describeOutput() {
  $("scale-value").textContent = `${$("scale").value}×`;
  const known = items.filter((i) => i.width);
  for (const item of known) item.el.querySelector(".meta").textContent = itemMeta(item);
  if (!known.length) { $("output-size").textContent = ""; return; }
  const [w, h] = outputSize(known[0].width, known[0].height);
  $("output-size").textContent = items.length > 1
    ? `${items.length} images; the first becomes ${dims(w, h)}.`
    : `Output: ${dims(w, h)} (from ${dims(known[0].width, known[0].height)}).`;
}

function itemMeta(item) {
  const input = item.width ? `${dims(item.width, item.height)} · ${bytes(item.file.size)}` : bytes(item.file.size);
  if (item.blob) return `${input} → ${dims(item.outWidth, item.outHeight)} · ${bytes(item.blob.size)}`;
  if (!item.width) return input;
  const [w, h] = outputSize(item.width, item.height);
  return `${input} → ${dims(w, h)}`;
}

function setState(item, status, fraction, eta) {
  item.status = status;
  item.el.className = `item ${status}${item === shown ? " selected" : ""}`;
  item.el.querySelector("progress").value = fraction;
  const left = eta == null ? "" : eta >= 1 ? ` · about ${Math.round(eta)} s left` : " · under a second left";
  item.el.querySelector(".state").textContent = {
    queued: "queued", done: "done", failed: "failed",
  }[status] || `${status} · ${Math.round(fraction * 100)}%${left}`;
}

function addItem(file) {
  const item = { file, url: URL.createObjectURL(file), status: "queued" };
  const el = document.createElement("li");
  el.innerHTML = `<img alt=""><span class="name"></span><span class="state"></span>
    <span class="meta"></span><progress max="1" value="0"></progress><span class="links"></span>`;
  el.querySelector("img").src = item.url;
  el.querySelector(".name").textContent = file.name;
  el.querySelector(".name").title = file.name;
  item.el = el;
  $("queue").appendChild(el);
  const probe = new Image();
  probe.onload = () => { item.width = probe.naturalWidth; item.height = probe.naturalHeight; describeOutput(); };
  probe.src = item.url;
  setState(item, "queued", 0, null);
  return item;
}

function choose(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || !f.type);
  if (!images.length || running) return;
  for (const item of items) { URL.revokeObjectURL(item.url); if (item.resultUrl) URL.revokeObjectURL(item.resultUrl); }
  $("queue").innerHTML = "";
  $("result").hidden = true;
  $("candidates-section").hidden = true;
  shown = null;
  items = images.map(addItem);
  $("queue-section").hidden = false;
  $("drop-hint").textContent = images.length === 1 ? images[0].name : `${images.length} images`;
  $("zip").disabled = true;
  setControls();
  describeOutput();
}

function setControls() {
  $("run").disabled = running || !items.length;
  $("compare").disabled = running || !items.length;
  $("file").disabled = running;
  $("drop").classList.toggle("busy", running);
  $("run").textContent = running ? "Running…" : items.length > 1 ? `Run ${items.length} images` : "Run";
  $("zip").disabled = running || !items.some((i) => i.blob);
}

// Reads a server-sent event stream with fetch, so that the token can be sent.
async function followEvents(jobId, onEvent) {
  const response = await api(`/v1/jobs/${jobId}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(chunk);
      const data = /^data: (.*)$/m.exec(chunk);
      if (event && data && onEvent(event[1], JSON.parse(data[1]))) return;
    }
  }
}

async function runItem(item, list) {
  const form = new FormData();
  form.append("file", item.file);
  form.append("steps", JSON.stringify(list));
  form.append("format", $("format").value);
  setState(item, "queued", 0, null);
  try {
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    let final = null;
    await followEvents(job.id, (event, view) => {
      if (event === "done" || event === "failed") { final = view; return true; }
      setState(item, view.status, view.progress.fraction, view.eta_seconds);
      return false;
    });
    if (!final || final.status !== "done") throw new Error(final && final.error ? final.error.message : "the job failed");
    item.blob = await (await api(`/v1/jobs/${job.id}/result`)).blob();
    item.resultUrl = URL.createObjectURL(item.blob);
    item.steps = final.steps;
    const size = await imageSize(item.resultUrl);
    [item.outWidth, item.outHeight] = size;
    setState(item, "done", 1, null);
    item.el.querySelector(".meta").textContent = itemMeta(item);
    addLinks(item);
    if (!shown) showResult(item);
  } catch (error) {
    setState(item, "failed", 0, null);
    item.el.querySelector(".meta").textContent = String(error.message || error);
  }
}

function imageSize(url) {
  return new Promise((resolve) => {
    const probe = new Image();
    probe.onload = () => resolve([probe.naturalWidth, probe.naturalHeight]);
    probe.onerror = () => resolve([0, 0]);
    probe.src = url;
  });
}

function resultName(item) {
  const ext = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" }[item.blob.type] || "png";
  return `${item.file.name.replace(/\.[^.]*$/, "")}.imagemesh.${ext}`;
}

function addLinks(item) {
  const links = item.el.querySelector(".links");
  links.innerHTML = "";
  const show = document.createElement("button");
  show.textContent = "Compare";
  show.addEventListener("click", () => showResult(item));
  const save = document.createElement("a");
  save.textContent = "Download";
  save.href = item.resultUrl;
  save.download = resultName(item);
  links.append(show, save);
}

async function run() {
  showError(null);
  const list = steps();
  if (!list.length) return showError("choose at least one step");
  running = true;
  shown = null;
  $("result").hidden = true;
  $("candidates-section").hidden = true;
  for (const item of items) {
    item.blob = null;
    item.el.querySelector(".links").innerHTML = "";
    setState(item, "queued", 0, null);
  }
  setControls();
  try {
    const waiting = [...items];
    const worker = async () => { while (waiting.length) await runItem(waiting.shift(), list); };
    await Promise.all(Array.from({ length: Math.min(JOBS_AT_ONCE, items.length) }, worker));
    const failed = items.filter((i) => i.status === "failed");
    if (failed.length) showError(`${failed.length} of ${items.length} failed: ${failed[0].el.querySelector(".meta").textContent}`);
  } finally {
    running = false;
    setControls();
  }
}

// --- before/after: a divider, and zoom and pan that both sides share ---------------

const view = { zoom: 1, x: 0, y: 0, divider: 50 };

function applyView() {
  const transform = `translate(${view.x}px, ${view.y}px) scale(${view.zoom})`;
  $("before").style.transform = $("after").style.transform = transform;
  $("before-layer").style.clipPath = `inset(0 ${100 - view.divider}% 0 0)`;
  $("divider").style.left = `${view.divider}%`;
  $("slider").value = view.divider;
  $("zoom-level").textContent = `${Math.round(view.zoom * 100)}%`;
}

function resetView() {
  Object.assign(view, { zoom: 1, x: 0, y: 0, divider: 50 });
  applyView();
}

// Zoom by `factor` keeping the stage point (px, py) where it is.
function zoomAt(factor, px, py) {
  const zoom = Math.min(16, Math.max(1, view.zoom * factor));
  const applied = zoom / view.zoom;
  view.x = px - (px - view.x) * applied;
  view.y = py - (py - view.y) * applied;
  view.zoom = zoom;
  if (zoom === 1) { view.x = 0; view.y = 0; }
  applyView();
}

function showResult(item) {
  shown = item;
  for (const other of items) other.el.classList.toggle("selected", other === item);
  $("before").src = item.url;
  $("after").src = item.resultUrl;
  $("download").href = item.resultUrl;
  $("download").download = resultName(item);
  $("result-title").textContent = item.file.name;
  $("result-sizes").innerHTML = `<dt>Before</dt><dd>${dims(item.width, item.height)} · ${bytes(item.file.size)}</dd>
    <dt>After</dt><dd>${dims(item.outWidth, item.outHeight)} · ${bytes(item.blob.size)}</dd>`;
  $("result-info").textContent = (item.steps || []).map((s) => `${s.op}: ${s.name} (${s.backend})`).join(" · ");
  resetView();
  $("result").hidden = false;
  if (PHONE.matches) $("result").scrollIntoView({ block: "start" });
}

function stagePoint(event) {
  const box = $("stage").getBoundingClientRect();
  return [event.clientX - box.left, event.clientY - box.top, box];
}

let drag = null;
$("stage").addEventListener("pointerdown", (event) => {
  const [px, py, box] = stagePoint(event);
  const nearDivider = Math.abs(px - box.width * view.divider / 100) < 24;
  drag = { mode: nearDivider || view.zoom === 1 ? "divider" : "pan", px, py, x: view.x, y: view.y };
  $("stage").setPointerCapture(event.pointerId);
  $("stage").classList.toggle("panning", drag.mode === "pan");
  if (drag.mode === "divider") { view.divider = Math.min(100, Math.max(0, px / box.width * 100)); applyView(); }
});
$("stage").addEventListener("pointermove", (event) => {
  if (!drag) return;
  const [px, py, box] = stagePoint(event);
  if (drag.mode === "divider") view.divider = Math.min(100, Math.max(0, px / box.width * 100));
  else { view.x = drag.x + px - drag.px; view.y = drag.y + py - drag.py; }
  applyView();
});
for (const end of ["pointerup", "pointercancel"]) {
  $("stage").addEventListener(end, () => { drag = null; $("stage").classList.remove("panning"); });
}
$("stage").addEventListener("wheel", (event) => {
  event.preventDefault();
  const [px, py] = stagePoint(event);
  zoomAt(event.deltaY < 0 ? 1.25 : 0.8, px, py);
}, { passive: false });
const centre = () => { const box = $("stage").getBoundingClientRect(); return [box.width / 2, box.height / 2]; };
$("zoom-in").addEventListener("click", () => zoomAt(1.5, ...centre()));
$("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, ...centre()));
$("zoom-fit").addEventListener("click", () => { view.zoom = 1; view.x = view.y = 0; applyView(); });
$("slider").addEventListener("input", () => { view.divider = Number($("slider").value); applyView(); });

// --- comparing background-removal models on the first image -------------------------

async function compare() {
  showError(null);
  const models = [...document.querySelectorAll(".compare-model:checked")].map((c) => c.value);
  if (models.length < 2) return showError("check at least two models to compare");
  running = true;
  setControls();
  try {
    const item = items[0];
    const form = new FormData();
    form.append("file", item.file);
    form.append("models", models.join(","));
    form.append("format", "png");
    const answer = await (await api("/v1/remove-background", { method: "POST", body: form })).json();
    const box = $("candidates");
    box.innerHTML = "";
    for (const c of answer.candidates) {
      const card = document.createElement("div");
      card.className = "candidate";
      card.innerHTML = `<img alt="${escape(c.model)}" src="data:image/${c.format};base64,${c.image_base64}">
        <p>${escape(c.model)} · ${Math.round(c.compute_ms)} ms ${c.cache_hit ? '<span class="badge">cached</span>' : ""}</p>
        <button>Use this</button>`;
      card.querySelector("button").addEventListener("click", async () => {
        try {
          await api("/v1/remove-background/choice", { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ request_id: answer.request_id, model: c.model }) });
          for (const other of box.children) other.classList.remove("chosen");
          card.classList.add("chosen");
          item.blob = await (await fetch(card.querySelector("img").src)).blob();
          item.resultUrl = URL.createObjectURL(item.blob);
          [item.outWidth, item.outHeight] = [c.width, c.height];
          item.steps = [{ op: "remove_background", name: c.model, backend: "chosen" }];
          setState(item, "done", 1, null);
          item.el.querySelector(".meta").textContent = itemMeta(item);
          addLinks(item);
          showResult(item);
          $("result-info").textContent = `remove_background: ${c.model} (chosen)`;
          setControls();
        } catch (error) { showError(error); }
      });
      box.appendChild(card);
    }
    $("candidates-section").hidden = false;
  } catch (error) {
    showError(error);
  } finally {
    running = false;
    setControls();
  }
}

// --- a zip of every result (stored, not compressed: the images are compressed already) ---

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(data) {
  let crc = 0xFFFFFFFF;
  for (let i = 0; i < data.length; i++) crc = CRC_TABLE[(crc ^ data[i]) & 0xFF] ^ (crc >>> 8);
  return (crc ^ 0xFFFFFFFF) >>> 0;
}

async function zipOf(files) {
  const encoder = new TextEncoder();
  const parts = [], directory = [];
  let offset = 0;
  for (const { name, blob } of files) {
    const data = new Uint8Array(await blob.arrayBuffer());
    const nameBytes = encoder.encode(name);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    [[0, 0x04034b50, 4], [4, 20, 2], [6, 0x0800, 2], [14, crc, 4], [18, data.length, 4], [22, data.length, 4],
      [26, nameBytes.length, 2]].forEach(([at, value, size]) => size === 4 ? local.setUint32(at, value, true) : local.setUint16(at, value, true));
    const central = new DataView(new ArrayBuffer(46));
    [[0, 0x02014b50, 4], [4, 20, 2], [6, 20, 2], [8, 0x0800, 2], [16, crc, 4], [20, data.length, 4],
      [24, data.length, 4], [28, nameBytes.length, 2], [42, offset, 4]].forEach(([at, value, size]) => size === 4 ? central.setUint32(at, value, true) : central.setUint16(at, value, true));
    parts.push(local, nameBytes, data);
    directory.push(central, nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = directory.reduce((n, part) => n + part.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  [[0, 0x06054b50, 4], [8, files.length, 2], [10, files.length, 2], [12, size, 4], [16, offset, 4]]
    .forEach(([at, value, bytesWide]) => bytesWide === 4 ? end.setUint32(at, value, true) : end.setUint16(at, value, true));
  return new Blob([...parts, ...directory, end], { type: "application/zip" });
}

async function downloadZip() {
  const names = new Set();
  const files = items.filter((i) => i.blob).map((item) => {
    let name = resultName(item);
    for (let n = 2; names.has(name); n++) name = resultName(item).replace(/(\.[^.]*)$/, ` (${n})$1`);
    names.add(name);
    return { name, blob: item.blob };
  });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await zipOf(files));
  link.download = "imagemesh-results.zip";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

$("file").addEventListener("change", () => choose($("file").files));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.remove("over"); choose(e.dataTransfer.files); });
$("effect").addEventListener("change", renderEffectParams);
for (const id of ["scale", "use-upscale"]) $(id).addEventListener("input", describeOutput);
// A step that is off shows its settings dimmed.
for (const toggle of document.querySelectorAll("legend input[type=checkbox]")) {
  const fieldset = toggle.closest("fieldset");
  const dim = () => fieldset.classList.toggle("off", !toggle.checked);
  toggle.addEventListener("change", dim);
  dim();
}
$("run").addEventListener("click", run);
$("compare").addEventListener("click", compare);
$("zip").addEventListener("click", () => downloadZip().catch(showError));
load().catch(showError);
