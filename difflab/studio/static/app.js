// difflab studio: the page. It talks to the server's JSON API only (see difflab/studio/server.py).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, models: {}, image: null, jobs: {}, shown: new Set(), painted: false };

// Each tab has its own id (sessionStorage is per tab): its jobs, progress and results are its own.
function clientId() {
  let id = sessionStorage.getItem("studio-client");
  if (!id) {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("studio-client", id);
  }
  return id;
}
const CLIENT = clientId();

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("the studio server does not answer (" + e.message + ")");
  }
  let data;
  try { data = await response.json(); } catch (e) { data = { error: "the server answered " + response.status }; }
  if (!response.ok) throw new Error(data.error || "the server answered " + response.status);
  return data;
}

function showError(message) { const e = $("error"); e.textContent = message; e.hidden = !message; }
function showNotice(message) { const e = $("notice"); e.textContent = message; e.hidden = !message; }

function fill(select, values, labels) {
  select.replaceChildren(...values.map((v, i) => new Option(labels ? labels[i] : v, v)));
}

// ---------------------------------------------------------------------------------------------
// The form

function model() { return state.models[$("model").value]; }

function setModel(name, keepFields) {
  const m = state.models[name];
  if (!m) return;
  $("model").value = name;
  fill($("mode"), m.modes);
  const classes = m.num_classes ? ["none", ...Array.from({ length: m.num_classes }, (_, i) => String(i))] : ["none"];
  fill($("class_label"), classes, classes.map((c) => (c === "none" ? "(unconditional)" : c)));
  if (!keepFields) {
    const d = m.defaults || {};
    if (d.sampler) $("sampler").value = d.sampler;
    $("steps").value = d.steps || 20;
    $("guidance").value = m.kind === "checkpoint" ? 1 : d.guidance ?? 7.5;
    $("width").value = d.width || 512;
    $("height").value = d.height || 512;
    $("grid").value = "model";
  }
  updateMode();
}

function updateMode() {
  const m = model();
  const mode = $("mode").value;
  const text = m && m.kind !== "checkpoint";
  const show = (selector, on) => document.querySelectorAll(selector).forEach((e) => { e.hidden = !on; });
  show(".for-class", !text);
  show(".for-text", text);
  show(".for-edit", mode !== "txt2img");
  show(".for-inpaint", mode === "inpaint");
  show(".for-outpaint", mode === "outpaint");
  show(".for-strength", mode === "img2img" || mode === "inpaint");
  show(".for-invert", mode === "invert");
  $("mask").hidden = mode !== "inpaint";
  $("sampler").disabled = mode === "invert";
}

function formBody() {
  const v = (id) => $(id).value;
  const body = {
    client: CLIENT, model: v("model"), mode: v("mode"), sampler: v("sampler"), grid: v("grid"), steps: v("steps"),
    guidance: v("guidance"), seed: v("seed"), batch_size: v("batch_size"),
  };
  if (model() && model().kind === "checkpoint") {
    body.class_label = v("class_label");
  } else {
    Object.assign(body, { prompt: v("prompt"), negative_prompt: v("negative_prompt"), width: v("width"), height: v("height") });
  }
  if (body.mode === "img2img" || body.mode === "inpaint") body.strength = v("strength");
  if (body.mode !== "txt2img") body.image = state.image;
  if (body.mode === "inpaint") body.mask = maskDataUrl();
  if (body.mode === "outpaint") {
    body.pads = { left: v("pad_left"), right: v("pad_right"), top: v("pad_top"), bottom: v("pad_bottom") };
  }
  if (body.mode === "invert") body.source_prompt = v("source_prompt");
  return body;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  try {
    const job = await api("/api/jobs", formBody());
    state.jobs[job.id] = { status: "queued" };
    $("status").textContent = "queued, place " + job.position;
  } catch (e) {
    showError(e.message);
  }
}

async function cancel() {
  const open = Object.entries(state.jobs).filter(([, j]) => j.status === "queued" || j.status === "running");
  for (const [id] of open) {
    try { await api("/api/cancel", { client: CLIENT, id }); } catch (e) { showError(e.message); }
  }
}

// ---------------------------------------------------------------------------------------------
// Progress and results: this tab polls its own jobs

function figure(entry) {
  const f = document.createElement("figure");
  const img = document.createElement("img");
  img.src = entry.url;
  img.alt = entry.name;
  img.dataset.name = entry.name;
  img.title = entry.params ? entry.params.parameters || "" : "";
  const caption = document.createElement("figcaption");
  const p = entry.params || {};
  caption.textContent = p.class_label !== undefined ? "class " + p.class_label + ", seed " + p.seed : (p.prompt || "") + " #" + (p.batch_pos ?? "");
  f.append(img, caption);
  return f;
}

async function poll() {
  let data;
  try {
    data = await api("/api/jobs?client=" + CLIENT);
    $("connection").textContent = "";
  } catch (e) {
    $("connection").textContent = e.message;
    return;
  }
  let current = null;
  for (const job of data.jobs) {
    const known = state.jobs[job.id] || {};
    state.jobs[job.id] = job;
    if (job.status === "queued" || job.status === "running") current = current || job;
    if (job.status === "error" && known.status !== "error") showError(job.error);
    if (job.status === "done" && !state.shown.has(job.id)) {
      state.shown.add(job.id);
      const group = document.createElement("div");
      group.className = "job";
      group.dataset.job = job.id;
      group.append(...job.results.map((r) => { const f = figure(r); f.classList.add("result"); return f; }));
      $("results").prepend(group);
    }
    if (job.status === "cancelled" && !state.shown.has(job.id)) {
      state.shown.add(job.id);
      $("status").textContent = "cancelled";
    }
  }
  if (current) {
    $("status").textContent = current.status === "queued" ? "queued, place " + (current.position + 1) : "running: " + current.message;
    $("progress").value = current.progress;
    if (current.preview) { $("preview").src = current.preview; $("preview").hidden = false; }
  } else {
    $("preview").hidden = true;
  }
  if (!current && data.jobs.length) {
    const last = data.jobs[data.jobs.length - 1];
    $("status").textContent = last.status === "done" ? "done" : last.status;
    $("progress").value = last.status === "done" ? 1 : 0;
  }
}

// ---------------------------------------------------------------------------------------------
// The image to edit and the mask painted over it

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read " + file.name));
    reader.readAsDataURL(file);
  });
}

function setImage(url) {
  state.image = url;
  $("source").src = url;
  clearMask();
}

function clearMask() {
  const c = $("mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.painted = false;
}

function paintAt(event) {
  const c = $("mask");
  const r = c.getBoundingClientRect();
  const x = ((event.clientX - r.left) * c.width) / r.width, y = ((event.clientY - r.top) * c.height) / r.height;
  const g = c.getContext("2d");
  g.fillStyle = "#fff";
  g.beginPath();
  g.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI);
  g.fill();
  state.painted = true;
}

function maskDataUrl() {
  if (!state.painted) return null;
  const c = $("mask");
  const out = document.createElement("canvas");
  out.width = c.width;
  out.height = c.height;
  const g = out.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, out.width, out.height);
  g.drawImage(c, 0, 0);
  return out.toDataURL("image/png");
}

function setMask(url) {
  const img = new Image();
  img.onload = () => {
    const c = $("mask");
    const g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    g.imageSmoothingEnabled = false;
    g.drawImage(img, 0, 0, c.width, c.height);
    const pixels = g.getImageData(0, 0, c.width, c.height);
    for (let i = 0; i < pixels.data.length; i += 4) pixels.data[i + 3] = pixels.data[i] >= 128 ? 255 : 0;
    g.putImageData(pixels, 0, 0);
    state.painted = true;
  };
  img.src = url;
}

// ---------------------------------------------------------------------------------------------
// Parameters from a dropped PNG

async function loadParameters(file) {
  showError("");
  showNotice("");
  try {
    const data = await api("/api/params", { image: await readFile(file) });
    const p = data.params;
    if (p.model && !state.models[p.model]) throw new Error("this PNG was made with model " + JSON.stringify(p.model) + ", which this studio does not serve");
    if (p.model) setModel(p.model, true);
    if (p.mode) { $("mode").value = p.mode; updateMode(); }
    const set = (id, value) => { if (value !== undefined && value !== null && value !== "") $(id).value = value; };
    set("prompt", p.prompt);
    set("negative_prompt", p.negative_prompt);
    set("source_prompt", p.source_prompt);
    set("steps", p.steps);
    set("guidance", p.guidance);
    set("seed", p.seed);
    set("batch_size", p.batch_size);
    set("strength", p.strength);
    set("class_label", p.class_label ?? "none");
    if (p.sampler) {
      if (![...$("sampler").options].some((o) => o.value === p.sampler)) $("sampler").append(new Option(p.sampler, p.sampler));
      $("sampler").value = p.sampler;
    }
    set("grid", p.grid);
    if (p.size && /^\d+x\d+$/.test(p.size)) { const [w, h] = p.size.split("x"); set("width", w); set("height", h); }
    if (p.outpaint) { const [l, r, t, b] = p.outpaint.split(","); set("pad_left", l); set("pad_right", r); set("pad_top", t); set("pad_bottom", b); }
    if (data.inputs.init_image) setImage(data.inputs.init_image);
    if (data.inputs.mask_image) setMask(data.inputs.mask_image);
    showNotice("parameters loaded from " + file.name + (p.batch_pos !== undefined ? " (image " + p.batch_pos + " of its batch)" : ""));
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------------------------------------
// The gallery

async function openGallery() {
  try {
    const data = await api("/api/gallery");
    const g = $("gallery");
    g.replaceChildren(...data.entries.map((e) => { const f = figure(e); f.classList.add("gallery-item"); return f; }));
    if (!data.entries.length) g.textContent = "no images yet";
    g.hidden = false;
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------------------------------------

async function start() {
  try {
    state.config = await api("/api/config");
    const models = (await api("/api/models")).models;
    models.forEach((m) => { state.models[m.name] = m; });
    fill($("sampler"), state.config.samplers);
    fill($("grid"), state.config.grids);
    fill($("model"), models.map((m) => m.name), models.map((m) => m.name + " (" + m.kind + ")"));
    if (!models.length) showError("the models folder holds no model the studio can serve");
    else setModel(models[0].name);
  } catch (e) {
    showError(e.message);
  }
  $("model").addEventListener("change", () => setModel($("model").value));
  $("mode").addEventListener("change", updateMode);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("clear_mask").addEventListener("click", clearMask);
  $("open_gallery").addEventListener("click", openGallery);
  $("image_file").addEventListener("change", async () => {
    const file = $("image_file").files[0];
    if (file) setImage(await readFile(file));
  });
  $("params_file").addEventListener("change", () => { const f = $("params_file").files[0]; if (f) loadParameters(f); });
  let painting = false;
  $("mask").addEventListener("pointerdown", (e) => { painting = true; paintAt(e); });
  $("mask").addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
  window.addEventListener("pointerup", () => { painting = false; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
  document.addEventListener("dragleave", () => $("drop").classList.remove("over"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop").classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) loadParameters(file);
  });
  setInterval(poll, 200);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);
