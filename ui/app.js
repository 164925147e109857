// The camserve viewer: one page, no build step, only this server's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], file: null, lastQuery: null, objectUrls: [] };

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`listing models failed: ${response.status}`);
  state.models = (await response.json()).models;
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(`${m.name} (${m.num_classes} classes)`, m.name)));
  showModel();
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function showModel() {
  const model = currentModel();
  if (!model) return;
  $("method").replaceChildren(...model.methods.map((m) => new Option(m, m)));
  $("labels").replaceChildren(...model.labels.map((label) => new Option(label)));
  $("top-k").max = String(Math.min(32, model.num_classes));
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  const size = file.size < 1024 ? `${file.size} bytes` : `${(file.size / 1024).toFixed(1)} KiB`;
  $("file-name").textContent = `${file.name} (${size})`;
}

function buildQuery() {
  const query = new URLSearchParams();
  if (document.querySelector("input[name=targets]:checked").value === "class") {
    const names = $("classes").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (names.length === 0) throw new Error("Enter at least one class name, or choose the model's best classes.");
    names.forEach((name) => query.append("class", name));
  } else {
    query.set("top_k", $("top-k").value || "1");
  }
  query.set("method", $("method").value);
  query.set("threshold", $("threshold").value);
  query.set("max_boxes", $("max-boxes").value);
  return query;
}

async function post(query) {
  const url = `/v1/models/${encodeURIComponent($("model").value)}/explain?${query}`;
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": state.file.type || "application/octet-stream" },
    body: state.file,
  });
  const body = await response.json();
  if (!response.ok) {
    const error = body.error || {};
    throw new Error(`${error.message || response.statusText} (${error.code || response.status})`);
  }
  return body;
}

async function explain(event) {
  event.preventDefault();
  if (!state.file) {
    setStatus("Choose an image first.", true);
    $("image").focus();
    return;
  }
  let query;
  try {
    query = buildQuery();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  $("explain").disabled = true;
  setStatus("Explaining…");
  try {
    // The trust score costs one more Run and belongs beside the pictures; the exports leave it out.
    const shown = new URLSearchParams(query);
    shown.set("trust", "true");
    const body = await post(shown);
    state.lastQuery = query;
    render(body);
    setStatus(`Explained ${body.explanations.length} class(es) of a ${body.image.width}×${body.image.height} image.`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("explain").disabled = false;
  }
}

function releaseUrls() {
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
}

function blobUrl(data, type) {
  const url = URL.createObjectURL(new Blob([data], { type }));
  state.objectUrls.push(url);
  return url;
}

function link(text, href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  a.textContent = text;
  return a;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

// Boxes are in original-image pixels; the SVG's viewBox is the image's size, so it scales with the picture.
function boxesSvg(boxes, image, label) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${boxes.length} box(es) around where the model looked for ${label}`);
  svg.classList.add("boxes");
  for (const b of boxes) {
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", b.x_min);
    rect.setAttribute("y", b.y_min);
    rect.setAttribute("width", b.width);
    rect.setAttribute("height", b.height);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${label}: x ${b.x_min}–${b.x_max}, y ${b.y_min}–${b.y_max}`;
    rect.append(title);
    svg.append(rect);
  }
  return svg;
}

function render(body) {
  releaseUrls();
  const rows = (body.predictions || []).map((p) =>
    el("tr", {}, [el("td", { textContent: p.class }), el("td", { textContent: p.label }),
      el("td", { textContent: `${(100 * p.probability).toFixed(2)} %` })]));
  $("predictions").tBodies[0].replaceChildren(...rows);
  const percent = (p) => `${(100 * p).toFixed(2)} %`;
  $("trust-score").replaceChildren(...body.explanations.filter((t) => t.trust).map((t) => el("li", {
    textContent: `${t.label}: ${percent(t.trust.probability)} on the image, ${percent(t.trust.kept_probability)} kept, `
      + `${percent(t.trust.removed_probability)} removed`,
  })));

  const cards = body.explanations.map((t, i) => {
    const name = `${body.model}-${t.class}-${t.label}`.replace(/[^\w.-]+/g, "_");
    const overlaySrc = `data:image/png;base64,${t.overlay_png}`;
    const heatmapSrc = `data:image/png;base64,${t.heatmap_png}`;
    const boxes = t.boxes || [];
    const overlay = el("figure", {}, [
      el("div", { className: "stage" }, [
        el("img", { src: overlaySrc, alt: `Grad-CAM overlay for ${t.label} on the uploaded image`, className: "overlay" }),
        boxesSvg(boxes, body.image, t.label),
      ]),
      el("figcaption", { textContent: `Overlay with ${boxes.length} box(es)` }),
    ]);
    const heatmap = el("figure", {}, [
      el("div", { className: "stage" }, [
        el("img", { src: heatmapSrc, alt: `Heatmap for ${t.label}: red where the model looked most`, className: "heatmap" }),
      ]),
      el("figcaption", { textContent: "Heatmap (JET colours, normalized)" }),
    ]);
    const boxList = el("ul", { className: "box-list" }, boxes.map((b) =>
      el("li", { textContent: `x ${b.x_min}–${b.x_max}, y ${b.y_min}–${b.y_max} (${b.area} px, peak ${b.peak.toFixed(2)})` })));
    const downloads = el("div", { className: "downloads" }, [
      link("Overlay PNG", overlaySrc, `${name}-overlay.png`),
      link("Heatmap PNG", heatmapSrc, `${name}-heatmap.png`),
      link("Boxes JSON", blobUrl(JSON.stringify(boxes, null, 2), "application/json"), `${name}-boxes.json`),
      link("Map JSON", blobUrl(JSON.stringify(t.map), "application/json"), `${name}-map.json`),
    ]);
    return el("section", { className: "target", id: `target-${i}` }, [
      el("h3", { textContent: `${t.label} (class ${t.class}): ${(100 * t.probability).toFixed(2)} %` }),
      el("div", { className: "figures" }, [overlay, heatmap]),
      boxes.length ? boxList : el("p", { textContent: "No region crossed the threshold." }),
      downloads,
    ]);
  });
  $("targets").replaceChildren(...cards);
  $("results").hidden = false;
}

async function exportAs(format) {
  if (!state.lastQuery || !state.file) return;
  const query = new URLSearchParams(state.lastQuery);
  if (format !== "json") query.set("format", format);
  setStatus(`Preparing the ${format} export…`);
  try {
    const body = await post(query);
    const a = link("", blobUrl(JSON.stringify(body, null, 2), "application/json"), `${$("model").value}-${format}.json`);
    document.body.append(a);
    a.click();
    a.remove();
    setStatus(`Downloaded the ${format} export.`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragging")));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    chooseFile(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", showModel);
  $("image").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  $("classes").addEventListener("focus", () => { $("by-name").checked = true; });
  $("top-k").addEventListener("focus", () => { $("by-top-k").checked = true; });
  $("explain-form").addEventListener("submit", explain);
  document.querySelectorAll("#exports button").forEach((b) =>
    b.addEventListener("click", () => exportAs(b.dataset.format)));
  wireDropZone();
  loadModels().catch((e) => setStatus(e.message, true));
});
