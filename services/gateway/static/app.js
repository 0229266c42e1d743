"use strict";
// imagemesh web page: builds the steps, runs them as a job over /v1/jobs,
// follows its progress events, and shows the result before/after.

const $ = (id) => document.getElementById(id);
let image = null;          // the chosen File
let effects = [];          // from GET /v1/effects
let authRequired = false;

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

async function load() {
  const info = await (await fetch("/", { headers: { Accept: "application/json" } })).json();
  authRequired = info.auth_required;
  $("auth").hidden = !authRequired;
  const models = await (await fetch("/v1/models")).json();
  option($("up-model"), "auto", `auto (${models.defaults.upscaler})`);
  option($("bg-model"), "auto", `auto (${models.defaults.bgremoval})`);
  for (const m of models.models.filter((m) => m.ready)) {
    if (m.service === "upscaler") option($("up-model"), m.name, m.name);
    if (m.service === "bgremoval") {
      option($("bg-model"), m.name, m.name);
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" value="${m.name}" class="compare-model"> ${m.name}`;
      $("bg-compare").appendChild(label);
    }
  }
  effects = (await (await fetch("/v1/effects")).json()).effects;
  for (const e of effects) option($("effect"), e.name, e.name);
  renderEffectParams();
}

function renderEffectParams() {
  const effect = effects.find((e) => e.name === $("effect").value);
  const box = $("effect-params");
  box.innerHTML = "";
  if (!effect) return;
  for (const p of effect.params) {
    const label = document.createElement("label");
    label.title = p.description;
    label.innerHTML = `${p.name} <input type="number" data-param="${p.name}" min="${p.minimum}" max="${p.maximum}"
      step="any" value="${p.default}">`;
    box.appendChild(label);
  }
  for (const c of effect.options) {
    const label = document.createElement("label");
    label.title = c.description;
    const select = document.createElement("select");
    select.dataset.option = c.name;
    for (const v of c.values) option(select, v, v);
    select.value = c.default;
    label.append(`${c.name} `, select);
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

function setProgress(done, total, text) {
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
  $("progress-text").textContent = text;
}

function showResult(blob, info) {
  const url = URL.createObjectURL(blob);
  $("after").src = url;
  $("before").src = URL.createObjectURL(image);
  $("download").href = url;
  const ext = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" }[blob.type] || "png";
  $("download").download = `imagemesh.${ext}`;
  $("result-info").textContent = info;
  $("result").hidden = false;
  $("slider").dispatchEvent(new Event("input"));
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

async function run() {
  showError(null);
  $("result").hidden = true;
  $("candidates").hidden = true;
  const list = steps();
  if (!list.length) return showError("choose at least one step");
  $("run").disabled = true;
  try {
    const form = new FormData();
    form.append("file", image);
    form.append("steps", JSON.stringify(list));
    form.append("format", $("format").value);
    setProgress(0, 1, "queued");
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    let final = null;
    await followEvents(job.id, (event, view) => {
      const { tiles_done, tiles_total } = view.progress;
      setProgress(tiles_done, tiles_total, `${view.status}: ${tiles_done} / ${tiles_total || "?"} tiles`);
      if (event === "done" || event === "failed") { final = view; return true; }
      return false;
    });
    if (!final || final.status !== "done") throw new Error(final && final.error ? final.error.message : "the job failed");
    const { tiles_done, tiles_total } = final.progress;
    setProgress(tiles_done, tiles_total, `done: ${tiles_done} / ${tiles_total} tiles`);
    const blob = await (await api(`/v1/jobs/${job.id}/result`)).blob();
    showResult(blob, final.steps.map((s) => `${s.op}: ${s.name} (${s.backend})`).join(" · "));
  } catch (error) {
    showError(error);
  } finally {
    $("run").disabled = !image;
  }
}

async function compare() {
  showError(null);
  const models = [...document.querySelectorAll(".compare-model:checked")].map((c) => c.value);
  if (models.length < 2) return showError("check at least two models to compare");
  $("compare").disabled = true;
  try {
    const form = new FormData();
    form.append("file", image);
    form.append("models", models.join(","));
    form.append("format", "png");
    setProgress(0, 1, `running ${models.length} models`);
    const answer = await (await api("/v1/remove-background", { method: "POST", body: form })).json();
    setProgress(1, 1, "done");
    const box = $("candidates");
    box.innerHTML = "";
    for (const c of answer.candidates) {
      const card = document.createElement("div");
      card.className = "candidate";
      card.innerHTML = `<img alt="${c.model}" src="data:image/${c.format};base64,${c.image_base64}">
        <p>${c.model} · ${Math.round(c.compute_ms)} ms</p><button>Use this</button>`;
      card.querySelector("button").addEventListener("click", async () => {
        try {
          await api("/v1/remove-background/choice", { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ request_id: answer.request_id, model: c.model }) });
          for (const other of box.children) other.classList.remove("chosen");
          card.classList.add("chosen");
          const blob = await (await fetch(card.querySelector("img").src)).blob();
          showResult(blob, `remove_background: ${c.model} (chosen)`);
        } catch (error) { showError(error); }
      });
      box.appendChild(card);
    }
    box.hidden = false;
  } catch (error) {
    showError(error);
  } finally {
    $("compare").disabled = !image;
  }
}

function choose(file) {
  if (!file) return;
  image = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-hint").textContent = file.name;
  $("run").disabled = $("compare").disabled = false;
}

$("file").addEventListener("change", () => choose($("file").files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.remove("over"); choose(e.dataTransfer.files[0]); });
$("effect").addEventListener("change", renderEffectParams);
$("run").addEventListener("click", run);
$("compare").addEventListener("click", compare);
$("slider").addEventListener("input", () => {
  $("before").style.clipPath = `inset(0 ${100 - $("slider").value}% 0 0)`;
});
load().catch(showError);
