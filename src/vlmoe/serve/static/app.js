// vlmoe serve: the page. Plain JavaScript, no dependencies; talks to /api/* only.
// Test hooks: body[data-ready="1"] once loaded; body[data-state] = busy | done | error after
// each question; #error shows every error the API returns.
"use strict";

const state = { info: null, image: null, imageName: "image", modelsById: {} };
const $ = (id) => document.getElementById(id);
const CANVAS_PX = 192;
const MAX_ALPHA = 0.75; // the overlay at full router weight still lets the image show

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function hideError() { $("error").hidden = true; $("error").textContent = ""; }

function hexToRgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

function colorsFor(modelId, layerName, numExperts) {
  const layer = state.modelsById[modelId].layers.find((l) => l.name === layerName);
  if (layer && layer.colors) return layer.colors;
  return Array.from({ length: numExperts }, (_, i) => `hsl(${(360 * i) / numExperts}, 70%, 50%)`);
}

// ---- input -------------------------------------------------------------------------------

function setImage(blob, name, selectedButton) {
  state.image = blob;
  state.imageName = name;
  const img = $("preview");
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  for (const b of document.querySelectorAll(".examples button")) b.classList.remove("selected");
  if (selectedButton) selectedButton.classList.add("selected");
}

function renderExamples(examples) {
  for (const ex of examples) {
    const button = el("button", { type: "button", title: ex.question, "data-example": ex.id },
      el("img", { src: ex.url, alt: `example ${ex.id}` }));
    button.addEventListener("click", async () => {
      const r = await fetch(ex.url);
      setImage(await r.blob(), `example-${ex.id}.png`, button);
      $("question").value = ex.question;
    });
    $("examples").append(button);
  }
}

function onFile(ev) {
  const f = ev.target.files[0];
  if (f) setImage(f, f.name, null);
}

// ---- asking ------------------------------------------------------------------------------

function askOne(modelId) {
  const form = new FormData();
  if (state.image) form.append("image", state.image, state.imageName);
  form.append("question", $("question").value);
  form.append("model", modelId);
  return getJSON("/api/ask", { method: "POST", body: form });
}

async function onAsk(ev) {
  ev.preventDefault();
  hideError();
  if (!state.image) { showError("image: choose an example or upload an image first"); return; }
  document.body.dataset.state = "busy";
  const models = state.info.models;
  const settled = await Promise.allSettled(models.map((m) => askOne(m.id)));
  const errors = [];
  settled.forEach((s, i) => {
    const col = $(`col-${models[i].id}`);
    if (s.status === "fulfilled") renderResult(col, s.value);
    else {
      col.querySelector(".result").replaceChildren();
      errors.push(models.length > 1 ? `${models[i].name}: ${s.reason.message}` : s.reason.message);
    }
  });
  if (errors.length) showError([...new Set(errors)].join("\n"));
  document.body.dataset.state = errors.length ? "error" : "done";
}

// ---- results -----------------------------------------------------------------------------

function buildColumns() {
  for (const m of state.info.models) {
    const params = m.params_total
      ? `${(m.params_total / 1e6).toFixed(2)}M params, ${(m.params_active / 1e6).toFixed(2)}M active`
      : "";
    const moe = m.layers.length ? `${m.layers.length} MoE FFNs` : "dense (no MoE layers)";
    const cls = m.layers.length ? "column" : "column dense";
    $("results").append(el("div", { class: cls, id: `col-${m.id}`, "data-model": m.id },
      el("div", { class: "col-head" }, el("h2", {}, m.name),
        el("span", { class: "meta" }, `${m.preset} · ${moe} · ${params}`)),
      el("div", { class: "result" })));
  }
}

function renderResult(col, res) {
  const out = col.querySelector(".result");
  const top = el("div", { class: "top" });
  for (const t of res.top) {
    top.append(el("div", { class: "top-row" }, el("span", {}, t.answer),
      el("div", { class: "top-bar", style: `width:${(100 * t.prob).toFixed(1)}%` }),
      el("span", {}, `${(100 * t.prob).toFixed(1)}%`)));
  }
  const notes = [];
  if (res.question.unknown.length) notes.push(`not in the vocabulary: ${res.question.unknown.join(", ")}`);
  if (res.question.truncated) notes.push("question cut to the model's text length");
  const timing = `answered in ${res.timing_ms.total} ms (model ${res.timing_ms.model} ms)`;
  out.replaceChildren(
    el("div", { class: "answer" }, res.answer_text ?? res.answer),
    top,
    el("div", { class: "timing" }, timing),
    ...notes.map((n) => el("div", { class: "note" }, n)),
  );
  if (!res.layers.length) {
    out.append(el("p", { class: "note" }, "no MoE layers: every token goes through the same FFN"));
  }
  const byLayer = new Map();
  for (const rec of res.layers) {
    if (!byLayer.has(rec.layer)) byLayer.set(rec.layer, []);
    byLayer.get(rec.layer).push(rec);
  }
  for (const [layer, recs] of byLayer) out.append(renderLayer(res, layer, recs));
  out.dataset.answer = res.answer;
}

function renderLayer(res, layer, recs) {
  const body = el("div", { class: "layer-body" });
  const loads = el("div", { class: "loads" });
  for (const rec of recs) {
    const colors = colorsFor(res.model, rec.name, rec.num_experts);
    if (rec.modality === "vision") body.append(heatmap(res, rec, colors));
    else if (rec.modality === "text") body.append(words(res, rec, colors));
    loads.append(loadChart(rec, colors));
  }
  body.append(loads);
  return el("div", { class: "layer", "data-layer": layer }, el("h3", {}, `MoE layer ${layer}`), body);
}

function tokenLines(rec, t) {
  return rec.experts[t]
    .map((e, k) => (e < 0 ? null : `expert ${e}: ${rec.weights[t][k].toFixed(3)}`))
    .filter(Boolean).join("\n");
}

function heatmap(res, rec, colors) {
  const grid = res.image.grid;
  const canvas = el("canvas", { class: "heatmap", width: CANVAS_PX, height: CANVAS_PX,
    "data-name": rec.name });
  const ctx = canvas.getContext("2d");
  const cell = CANVAS_PX / grid;
  const byPatch = new Map(rec.positions.map((p, t) => [p, t]));
  const img = new Image();
  img.onload = () => {
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, CANVAS_PX, CANVAS_PX);
    ctx.font = `${Math.max(9, Math.min(16, cell / 3))}px system-ui, sans-serif`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (const [p, t] of byPatch) {
      const e = rec.experts[t][0];
      if (e < 0) continue;
      const x = (p % grid) * cell, y = Math.floor(p / grid) * cell;
      ctx.fillStyle = hexToRgba(colors[e], MAX_ALPHA * rec.weights[t][0]);
      ctx.fillRect(x, y, cell, cell);
      if (cell >= 20) { ctx.fillStyle = "#000"; ctx.fillText(String(e), x + cell / 2, y + cell / 2); }
    }
    canvas.dataset.drawn = "1";
  };
  img.src = res.image.png;
  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const col = Math.floor(((ev.clientX - r.left) / r.width) * grid);
    const row = Math.floor(((ev.clientY - r.top) / r.height) * grid);
    const t = byPatch.get(row * grid + col);
    if (t === undefined) return hideTip();
    showTip(ev, `${rec.name} · patch ${row * grid + col} (row ${row}, col ${col})\n${tokenLines(rec, t)}`);
  });
  canvas.addEventListener("mouseleave", hideTip);
  return el("div", {}, el("div", { class: "load-title" }, `${rec.name}: top-1 expert per patch`), canvas);
}

function words(res, rec, colors) {
  const box = el("div", { class: "words", "data-name": rec.name });
  rec.positions.forEach((pos, t) => {
    const word = res.question.tokens[pos] ?? `#${pos}`;
    const e = rec.experts[t][0];
    const span = el("span", { class: pos === 0 ? "word special" : "word", "data-expert": e,
      style: e < 0 ? "" : `background:${hexToRgba(colors[e], MAX_ALPHA * rec.weights[t][0])}` }, word);
    const text = `${rec.name} · "${word}" (position ${pos})\n${tokenLines(rec, t)}`;
    span.addEventListener("mouseenter", (ev) => showTip(ev, text));
    span.addEventListener("mousemove", (ev) => showTip(ev, text));
    span.addEventListener("mouseleave", hideTip);
    box.append(span);
  });
  return el("div", {}, el("div", { class: "load-title" }, `${rec.name}: top-1 expert per word`), box);
}

function loadChart(rec, colors) {
  const train = rec.train_load;
  const max = Math.max(...rec.load, ...(train || [0]), 1e-9);
  const chart = el("div", { class: "load", "data-name": rec.name },
    el("div", { class: "load-title" },
      `${rec.name} load: this request (colour)${train ? " vs training average (black)" : ""}`));
  rec.load.forEach((share, e) => {
    const bars = el("div", { class: "load-bars" },
      el("div", { class: "bar-req", style: `width:${(100 * share) / max}%;background:${colors[e]}` }));
    if (train) bars.append(el("div", { class: "bar-train", style: `width:${(100 * train[e]) / max}%` }));
    const label = train ? `${(100 * share).toFixed(0)} / ${(100 * train[e]).toFixed(0)}%` : `${(100 * share).toFixed(0)}%`;
    chart.append(el("div", { class: "load-row", "data-expert": e },
      el("span", {}, el("span", { class: "swatch", style: `background:${colors[e]}` }), ` ${e}`), bars,
      el("span", {}, label)));
  });
  return chart;
}

// ---- tooltip -----------------------------------------------------------------------------

function showTip(ev, text) {
  const tip = $("tooltip");
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${ev.clientX + 14}px`;
  tip.style.top = `${ev.clientY + 14}px`;
}
function hideTip() { $("tooltip").hidden = true; }

// ---- start -------------------------------------------------------------------------------

async function init() {
  try {
    state.info = await getJSON("/api/info");
    for (const m of state.info.models) state.modelsById[m.id] = m;
    $("models").textContent = state.info.models.map((m) => m.name).join("  |  ");
    buildColumns();
    renderExamples(await getJSON("/api/examples"));
  } catch (e) {
    showError(`cannot load the page's data: ${e.message}`);
    return;
  }
  $("file").addEventListener("change", onFile);
  $("ask-form").addEventListener("submit", onAsk);
  document.body.dataset.readyMs = String(Math.round(performance.now())); // since navigation
  document.body.dataset.ready = "1";
}

init();
