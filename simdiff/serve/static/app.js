// simdiff serve: the page. Every value goes to the server as typed; the server checks it and answers one message.
"use strict";

const $ = (id) => document.getElementById(id);
let MODELS = [];
let polling = null;

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text || value;
  select.appendChild(o);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text, fraction) {
  $("status").textContent = text;
  if (fraction !== undefined) $("bar").style.width = `${Math.round(100 * Math.max(0, Math.min(1, fraction)))}%`;
}

function currentModel() {
  return MODELS.find((m) => m.id === $("model").value);
}

function labelList() {
  return $("labels").value.split(",").map((s) => s.trim()).filter((s) => s !== "");
}

function syncChips() {
  const chosen = new Set(labelList());
  for (const b of $("chips").children) b.setAttribute("aria-pressed", chosen.has(b.dataset.label) ? "true" : "false");
}

function applyModel() {
  const m = currentModel();
  if (!m) return;
  const d = m.defaults;
  const shape = m.image_shape.join("x");
  const params = (m.parameters / 1e6).toFixed(2);
  $("model-info").textContent =
    `${m.arch}, ${params}M parameters, ${shape} ${m.data} images, ` +
    (m.class_conditional ? `${m.num_classes} classes` : "unconditional") +
    (m.kind !== "diffusion" ? `, distilled (${m.kind})` : "");
  $("sampler").value = d.sampler;
  $("steps").value = d.steps;
  $("grid").value = d.grid;
  $("guidance").value = d.guidance;
  $("interval-lo").value = d.interval ? d.interval[0] : "";
  $("interval-hi").value = d.interval ? d.interval[1] : "";
  $("seed").value = d.seed;
  $("num").value = d.num;
  $("labels").value = "";
  const chips = $("chips");
  chips.replaceChildren();
  if (m.class_conditional && m.num_classes <= 32) {
    for (let c = 0; c < m.num_classes; c++) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = c;
      b.dataset.label = String(c);
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => {
        const now = labelList();
        const i = now.indexOf(String(c));
        if (i >= 0) now.splice(i, 1); else now.push(String(c));
        $("labels").value = now.join(",");
        syncChips();
      });
      chips.appendChild(b);
    }
  }
  $("labels-row").hidden = !m.class_conditional;
  const locked = m.locked;
  for (const id of ["sampler", "steps", "grid"]) $(id).disabled = !!locked || (m.discrete && id !== "steps");
  const note = $("locked-note");
  if (locked) {
    note.textContent = `This student was distilled for ${locked.sampler}, ${locked.steps} step(s), grid ${locked.grid}; ` +
      "it samples only with those.";
  } else if (m.discrete) {
    note.textContent = "A discrete model: it samples with its own process; only the step count applies.";
  }
  note.hidden = !(locked || m.discrete);
  const noGuidance = !m.class_conditional || m.discrete || (locked && locked.sampler === "generator");
  for (const id of ["guidance", "interval-lo", "interval-hi"]) $(id).disabled = noGuidance;
  showError("");
}

function requestBody() {
  const m = currentModel();
  const body = { model: $("model").value };
  if (!$("sampler").disabled) body.sampler = $("sampler").value;
  if (!$("grid").disabled) body.grid = $("grid").value;
  if (!$("steps").disabled || (m && m.discrete)) body.steps = $("steps").value;
  if (!$("guidance").disabled) {
    body.guidance = $("guidance").value;
    const lo = $("interval-lo").value.trim();
    const hi = $("interval-hi").value.trim();
    body.interval = lo === "" && hi === "" ? null : [lo, hi];
  }
  body.seed = $("seed").value;
  body.num = $("num").value;
  if (m && m.class_conditional) body.labels = $("labels").value;
  return body;
}

function finish() {
  $("sample").disabled = false;
  polling = null;
}

async function poll(id) {
  let doc;
  try {
    const r = await fetch(`/api/jobs/${id}`);
    doc = await r.json();
    if (!r.ok) throw new Error(doc.error || `HTTP ${r.status}`);
  } catch (e) {
    showError(`lost the job: ${e.message}`);
    finish();
    return;
  }
  if (doc.status === "queued") {
    setStatus(`Waiting: ${doc.position || 0} request(s) ahead of this one`, 0);
  } else if (doc.status === "running") {
    setStatus(`Sampling: ${doc.done} / ${doc.total} network calls`, doc.done / Math.max(1, doc.total));
  } else if (doc.status === "done") {
    const p = doc.params;
    const img = $("result");
    img.onload = () => {
      img.hidden = false;
      setStatus(`Done in ${doc.seconds.toFixed(2)} s`, 1);
    };
    img.width = doc.width;
    img.src = doc.image;
    $("result-info").textContent =
      `${p.num} image(s) of ${p.model}: ${p.sampler}, ${p.steps} steps (${p.grid}), guidance ${p.guidance}` +
      (p.interval ? ` on log-SNR [${p.interval[0]}, ${p.interval[1]}]` : "") + `, seed ${p.seed}` +
      (p.labels ? `, labels ${p.labels.slice(0, 16).join(",")}${p.labels.length > 16 ? ",…" : ""}` : "");
    finish();
    return;
  } else {
    showError(doc.error || "sampling failed");
    setStatus("Failed.", 0);
    finish();
    return;
  }
  polling = setTimeout(() => poll(id), 150);
}

async function submit(event) {
  event.preventDefault();
  if (polling) return;
  showError("");
  $("sample").disabled = true;
  let r, doc;
  try {
    r = await fetch("/api/sample", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    doc = await r.json();
  } catch (e) {
    showError(`the server did not answer: ${e.message}`);
    finish();
    return;
  }
  if (!r.ok) {
    showError(doc.error || `HTTP ${r.status}`);
    finish();
    return;
  }
  setStatus("Queued", 0);
  polling = setTimeout(() => poll(doc.id), 50);
}

async function init() {
  let doc;
  try {
    doc = await (await fetch("/api/models")).json();
  } catch (e) {
    showError(`could not read the model list: ${e.message}`);
    return;
  }
  MODELS = doc.models;
  for (const m of MODELS) option($("model"), m.id, m.name);
  for (const s of doc.samplers) option($("sampler"), s);
  for (const g of doc.grids) option($("grid"), g);
  $("footer").textContent =
    `Sampling on ${doc.device}; at most ${doc.limits.max_images} images and ${doc.limits.max_steps} steps per ` +
    `request, ${doc.limits.max_queue} request(s) waiting per model. Only the models listed were given to this server.`;
  $("model").addEventListener("change", applyModel);
  $("labels").addEventListener("input", syncChips);
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
  $("form").addEventListener("submit", submit);
  applyModel();
  document.body.dataset.ready = "true";
}

init();
