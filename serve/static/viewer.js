// OrthoVision viewer: plain DOM, no framework, no network beyond this origin.
// Every value shown comes from the API and is inserted as text (never as HTML).
"use strict";

const KEY_STORAGE = "orthovision.apiKey";
const POLL_MS = 500;
const POLL_LIMIT_MS = 180000;
const CONCURRENCY = 2;

const $ = (sel, root = document) => root.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";

function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { "X-API-Key": key, ...extra } : extra;
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status} ${body.error.code}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

// 202 + Retry-After (an SC made on request, an explanation still running): wait and ask
// again, up to POLL_LIMIT_MS.
async function fetchBlobUrl(url) {
  const started = Date.now();
  for (;;) {
    const resp = await fetch(url, { headers: headers() });
    if (resp.status === 202 && Date.now() - started < POLL_LIMIT_MS) {
      const wait = 1000 * Number(resp.headers.get("Retry-After") || 1);
      await new Promise((resolve) => setTimeout(resolve, wait));
      continue;
    }
    if (!resp.ok || resp.status === 202) throw new Error(await apiError(resp));
    return URL.createObjectURL(await resp.blob());
  }
}

// ---- model card --------------------------------------------------------------------
let validatedClasses = null;

async function loadModelCard() {
  const box = $("#model-body");
  // Without a key too: a local service (auth off) answers; one with keys says 401.
  const resp = await fetch("/v1/model", { headers: headers() });
  if (!resp.ok) {
    box.textContent = resp.status === 401
      ? "Enter an API key to see the model card."
      : `Model card unavailable: ${await apiError(resp)}`;
    return;
  }
  const card = await resp.json();
  validatedClasses = card.validated_classes || [];
  box.replaceChildren();
  if (!card.trained) {
    box.append(el("p", { class: "untrained" },
      "This checkpoint has RANDOM, UNTRAINED weights: every result abstains."));
  }
  const dl = el("dl");
  const row = (k, v) => { dl.append(el("dt", {}, k), el("dd", {}, String(v))); };
  row("name", card.name);
  row("version", card.version);
  row("weights sha256", card.weights_sha256);
  row("trained", card.trained ? "yes" : "no");
  row("classes", (card.classes || []).join(", "));
  row("validated classes", validatedClasses.join(", ") || "none");
  row("architectures", Object.values(card.architectures || {}).join(" + "));
  if (card.created_at) row("created", card.created_at);
  box.append(dl);
}

keyInput.addEventListener("input", () => {
  sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
});
keyInput.addEventListener("change", loadModelCard);

// ---- image viewer: zoom, pan, window/level, heat map ---------------------------------
// The full radiograph on a canvas (its grey values mapped through the window), the heat
// map on a second canvas over it; both fill one layer that zoom and pan transform.
const MAX_SIDE = 2048; // the service's display renderings are no larger either
const ZOOM_STEP = 1.25;
const PAN_STEP = 40;
const WL_DEFAULT = { width: 256, centre: 128 }; // the identity on 8-bit grey

// DICOM PS3.3 C.11.2.1.2.1, the linear VOI function, on 0..255: 256/128 is the identity.
function windowLut(width, centre) {
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v += 1) {
    lut[v] = Math.round(((v - (centre - 0.5)) / (width - 1) + 0.5) * 255);
  }
  return lut;
}

// Where the source lies in the square model input the heat map belongs to: the box the
// service reports, else the letterbox of an image of this aspect ratio
// (orthovision/imaging/preprocess.py: fit the long side, centre, pad).
function letterboxBox(width, height, size) {
  const scale = size / Math.max(width, height);
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  return [Math.floor((size - w) / 2), Math.floor((size - h) / 2), w, h];
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = url;
  });
}

function createViewer(card) {
  const viewport = $(".viewport", card);
  const layer = $(".layer", card);
  const base = $(".base", card);
  const heat = $(".heat", card);
  const ww = $(".ww", card);
  const wc = $(".wc", card);
  const state = { scale: 1, x: 0, y: 0, fit: 1, grey: null, width: 0, height: 0 };

  const apply = () => {
    layer.style.transform = `translate(${state.x}px, ${state.y}px) scale(${state.scale})`;
    viewport.dataset.scale = String(state.scale);
    $(".zoom-value", card).textContent = `zoom ${Math.round(100 * state.scale)}%`;
  };
  const fit = () => {
    if (!state.width) return;
    const vw = viewport.clientWidth;
    const vh = viewport.clientHeight;
    state.fit = Math.min(vw / state.width, vh / state.height);
    state.scale = state.fit;
    state.x = (vw - state.width * state.scale) / 2;
    state.y = (vh - state.height * state.scale) / 2;
    apply();
  };
  // Zoom by `factor` keeping the layer point under (cx, cy) (viewport pixels) in place.
  const zoomAt = (factor, cx = viewport.clientWidth / 2, cy = viewport.clientHeight / 2) => {
    if (!state.width) return;
    // From half the fitted size up to 8 screen pixels an image pixel (or 16x the fit).
    const most = Math.max(8, 16 * state.fit);
    const scale = Math.min(Math.max(state.scale * factor, state.fit / 2), most);
    state.x = cx - ((cx - state.x) * scale) / state.scale;
    state.y = cy - ((cy - state.y) * scale) / state.scale;
    state.scale = scale;
    apply();
  };
  const pan = (dx, dy) => { state.x += dx; state.y += dy; apply(); };

  const drawWindow = () => {
    const width = Number(ww.value);
    const centre = Number(wc.value);
    $(".wl-value", card).textContent = `W ${width} / L ${centre}`;
    if (!state.grey) return;
    const ctx = base.getContext("2d");
    const out = new ImageData(new Uint8ClampedArray(state.grey.data), state.width, state.height);
    if (width !== WL_DEFAULT.width || centre !== WL_DEFAULT.centre) {
      const lut = windowLut(width, centre);
      const d = out.data;
      for (let i = 0; i < d.length; i += 4) {
        d[i] = lut[d[i]]; d[i + 1] = lut[d[i + 1]]; d[i + 2] = lut[d[i + 2]];
      }
    }
    ctx.putImageData(out, 0, 0);
  };
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; drawWindow(); });
  };
  ww.addEventListener("input", redraw);
  wc.addEventListener("input", redraw);
  $(".wl-reset", card).addEventListener("click", () => {
    ww.value = WL_DEFAULT.width;
    wc.value = WL_DEFAULT.centre;
    drawWindow();
  });
  $(".zoom-in", card).addEventListener("click", () => zoomAt(ZOOM_STEP));
  $(".zoom-out", card).addEventListener("click", () => zoomAt(1 / ZOOM_STEP));
  $(".zoom-fit", card).addEventListener("click", fit);
  viewport.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const rect = viewport.getBoundingClientRect();
    zoomAt(Math.exp(-ev.deltaY * 0.0015), ev.clientX - rect.left, ev.clientY - rect.top);
  }, { passive: false });
  viewport.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0) return;
    viewport.setPointerCapture(ev.pointerId);
    let last = [ev.clientX, ev.clientY];
    const move = (e) => {
      pan(e.clientX - last[0], e.clientY - last[1]);
      last = [e.clientX, e.clientY];
    };
    const up = () => {
      viewport.removeEventListener("pointermove", move);
      viewport.removeEventListener("pointerup", up);
      viewport.removeEventListener("pointercancel", up);
      viewport.classList.remove("dragging");
    };
    viewport.classList.add("dragging");
    viewport.addEventListener("pointermove", move);
    viewport.addEventListener("pointerup", up);
    viewport.addEventListener("pointercancel", up);
  });
  const keys = {
    "+": () => zoomAt(ZOOM_STEP), "=": () => zoomAt(ZOOM_STEP), "-": () => zoomAt(1 / ZOOM_STEP),
    "0": fit, ArrowLeft: () => pan(PAN_STEP, 0), ArrowRight: () => pan(-PAN_STEP, 0),
    ArrowUp: () => pan(0, PAN_STEP), ArrowDown: () => pan(0, -PAN_STEP),
  };
  viewport.addEventListener("keydown", (ev) => {
    const action = keys[ev.key];
    if (!action) return;
    ev.preventDefault();
    action();
  });
  drawWindow();

  return {
    // The full image (the upload, or the service's display rendering of a DICOM input),
    // at most MAX_SIDE on its long side. `kind` says which ("model-input" as a last resort).
    async setBase(url, kind) {
      const img = await loadImage(url);
      const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
      state.width = Math.max(1, Math.round(img.naturalWidth * scale));
      state.height = Math.max(1, Math.round(img.naturalHeight * scale));
      base.width = state.width;
      base.height = state.height;
      const ctx = base.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0, state.width, state.height);
      state.grey = ctx.getImageData(0, 0, state.width, state.height);
      layer.style.width = `${state.width}px`;
      layer.style.height = `${state.height}px`;
      base.hidden = false;
      card.dataset.image = kind;
      drawWindow();
      fit();
    },
    get kind() { return card.dataset.image || ""; },
    get size() { return [state.width, state.height]; },
    // The heat map of the model input, cropped to where the source lies in it (`box`:
    // left, top, width, height) and stretched over the full image by the layer.
    async setHeat(url, box) {
      const img = await loadImage(url);
      const [left, top, w, h] = box;
      heat.width = w;
      heat.height = h;
      heat.getContext("2d").drawImage(img, left, top, w, h, 0, 0, w, h);
      heat.hidden = false;
    },
    setOpacity(value) { heat.style.opacity = String(value); },
  };
}

// ---- one result card -----------------------------------------------------------------
function bars(container, probabilities, validated) {
  container.replaceChildren();
  const top = Object.entries(probabilities).reduce((a, b) => (b[1] > a[1] ? b : a))[0];
  for (const [name, p] of Object.entries(probabilities)) {
    const ok = validated.includes(name);
    const row = el("div", {
      class: `bar-row${name === top ? " top" : ""}${ok ? "" : " unvalidated"}`,
      "data-class": name,
    });
    const label = el("span", { class: "bar-name" }, name);
    if (!ok) label.append(el("span", { class: "nv", title: "no validation data" }, "not validated"));
    const track = el("div", { class: "bar-track" });
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    row.append(label, track, el("span", { class: "bar-value" }, `${(100 * p).toFixed(1)}%`));
    container.append(row);
  }
}

const topOf = (probs) => Object.entries(probs || {}).reduce((a, b) => (b[1] > a[1] ? b : a));

// When a branch's own top class differs from the fused one, say so: the reader should
// know that the two networks did not agree.
function branchDisagreement(result) {
  const [fused, fusedP] = topOf(result.probabilities);
  const others = Object.entries(result.branches || {})
    .map(([name, probs]) => [name, ...topOf(probs)])
    .filter(([, top]) => top !== fused);
  if (!others.length) return "";
  const said = others.map(([name, top, p]) => `${name} says ${top} (${(100 * p).toFixed(1)}%)`);
  return `The branches disagree: ${said.join("; ")}; fused: ${fused} (${(100 * fusedP).toFixed(1)}%).`;
}

function render(card, result) {
  const validated = result.validated_classes || [];
  card.dataset.requestId = result.request_id;
  const label = $(".label", card);
  if (result.abstained || !result.label) {
    label.textContent = `abstained (${result.abstain_reason || "no reason given"})`;
    label.classList.add("abstained");
  } else {
    label.textContent = result.label;
  }
  if (typeof result.ood_score === "number") {
    label.title = `out-of-distribution score ${result.ood_score.toFixed(2)} ` +
      "(distance from the training data; above the model card's threshold it abstains)";
  }
  bars($(".fused", card), result.probabilities, validated);
  const disagreement = branchDisagreement(result);
  if (disagreement) {
    $(".label-line", card).after(el("p", { class: "disagreement" }, disagreement));
  }
  const branches = $(".branches", card);
  for (const [name, probs] of Object.entries(result.branches || {})) {
    const weight = (result.fusion_weights || {})[name];
    branches.append(el("div", { class: "branch-name" },
      weight === undefined ? name : `${name} (fusion weight ${weight.toFixed(2)})`));
    const box = el("div", { class: "bars" });
    bars(box, probs, validated);
    branches.append(box);
  }
  const quality = $(".quality", card);
  const findings = (result.quality && result.quality.findings) || [];
  if (!findings.length) quality.append(el("li", {}, "no findings"));
  for (const f of findings) {
    quality.append(el("li", { class: f.severity }, `${f.severity}: ${f.check}: ${f.message}`));
  }
  const links = $(".links", card);
  const link = (text, url, name) => {
    const a = el("a", { href: "#" }, text);
    a.addEventListener("click", async (ev) => {
      ev.preventDefault();
      try {
        const href = await fetchBlobUrl(url);
        const tmp = el("a", { href, download: name });
        document.body.append(tmp);
        tmp.click();
        tmp.remove();
      } catch (err) {
        a.textContent = `${text} (${err.message})`;
      }
    });
    links.append(a);
  };
  const rid = result.request_id;
  link("PDF report", `/v1/predictions/${rid}/report.pdf`, `orthovision-${rid}.pdf`);
  if (result.input && result.input.format === "dicom") {
    link("DICOM SR", `/v1/predictions/${rid}/dicom/sr`, `orthovision-${rid}-sr.dcm`);
    // Always offered: without an explanation the service makes one on request.
    link("DICOM SC", `/v1/predictions/${rid}/dicom/sc`, `orthovision-${rid}-sc.dcm`);
  }
}

// A DICOM input of a known patient: the earlier studies of the same body part, from the
// pseudonymous timeline (GET /v1/studies/{uid}, then /v1/patients/{ref}/timeline).
async function showPriors(card, result) {
  const uid = result.study_instance_uid;
  if (!uid) return;
  const study = await fetch(`/v1/studies/${encodeURIComponent(uid)}`, { headers: headers() });
  if (!study.ok) return;
  const ref = (await study.json()).patient_ref;
  if (!ref) return;
  const resp = await fetch(`/v1/patients/${ref}/timeline`, { headers: headers() });
  if (!resp.ok) return;
  const listed = (await resp.json()).studies || [];
  const at = listed.findIndex((s) => s.study_instance_uid === uid);
  if (at < 0) return;
  const part = listed[at].body_part;
  const older = listed.slice(at + 1).filter((s) => part && s.body_part === part);
  if (!older.length) return;
  const box = el("div", { class: "priors", "data-testid": "priors" });
  box.append(el("h3", {}, `Prior studies (${part})`));
  const change = listed[at].change;
  if (change) box.append(el("p", { class: "change" }, `Change: ${change.summary}.`));
  const list = el("ul");
  for (const s of older) {
    const p = s.result.fracture_probability;
    const shown = p === null ? "none (every view abstained)" : p.toFixed(2);
    list.append(el("li", {}, `${s.study_date || s.received}: study fracture probability ${shown}`));
  }
  box.append(list);
  $(".links", card).before(box);
}

async function pollExplanation(card, viewer, url) {
  const status = $(".heat-status", card);
  status.textContent = "heat map: computing...";
  const started = Date.now();
  while (Date.now() - started < POLL_LIMIT_MS) {
    const resp = await fetch(url, { headers: headers() });
    if (resp.status === 202) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      continue;
    }
    if (!resp.ok) throw new Error(await apiError(resp));
    const body = await resp.json();
    if (body.state !== "done") throw new Error(body.error ? body.error.message : body.state);
    const size = (body.heatmap_size || [224, 224])[0];
    if (!viewer.kind) {
      // No full image (a DICOM input without a display rendering): the model input the
      // heat map belongs to, whole, letterbox included.
      await viewer.setBase(await fetchBlobUrl(`${url}.png?kind=image`), "model-input");
    }
    const [w, h] = viewer.size;
    const box = viewer.kind === "model-input" ? [0, 0, size, size]
      : body.input_box || letterboxBox(w, h, size);
    await viewer.setHeat(await fetchBlobUrl(`${url}.png?kind=heatmap`), box);
    const slider = $(".opacity", card);
    const apply = () => viewer.setOpacity(slider.value / 100);
    slider.addEventListener("input", apply);
    apply();
    $(".opacity-label", card).hidden = false;
    $(".legend", card).hidden = false;
    $(".heat-note", card).hidden = false;
    status.textContent = `heat map for ${body.target_class} (GradCAM++), ` +
      (viewer.kind === "model-input" ? "on the 224x224 model input" : "on the full image");
    card.dataset.state = "heatmap-ready";
    return;
  }
  throw new Error("timed out");
}

async function classify(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  const status = $(".status", card);
  status.textContent = "classifying...";
  card.dataset.state = "pending";
  $("#results").prepend(card);
  const viewer = createViewer(card);
  // PNG and JPEG: the browser shows the upload itself; DICOM: the service's rendering.
  const shown = /^image\/(png|jpeg)$/.test(file.type)
    ? viewer.setBase(URL.createObjectURL(file), "upload").catch(() => null)
    : Promise.resolve();

  const explain = $("#explain").checked;
  let resp;
  try {
    resp = await fetch(`/v1/predict?display=true${explain ? "&explain=true" : ""}`, {
      method: "POST",
      headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
      body: file,
    });
  } catch (err) {
    status.textContent = `network error: ${err.message}`;
    status.classList.add("error");
    card.dataset.state = "error";
    return;
  }
  if (!resp.ok) {
    status.textContent = await apiError(resp);
    status.classList.add("error");
    card.dataset.state = "error";
    return;
  }
  const result = await resp.json();
  status.textContent = `request ${result.request_id}`;
  render(card, result);
  await shown;
  if (result.input && result.input.format === "dicom" && !viewer.kind) {
    try {
      await viewer.setBase(
        await fetchBlobUrl(`/v1/predictions/${result.request_id}/image.png`), "display");
    } catch (err) {
      $(".heat-status", card).textContent = `no full image: ${err.message}`;
    }
  }
  await showPriors(card, result).catch(() => {});  // priors are extra: never fail the card
  card.dataset.state = "classified";
  if (!validatedClasses) loadModelCard();
  if (result.explanation_url) {
    try {
      await pollExplanation(card, viewer, result.explanation_url);
    } catch (err) {
      $(".heat-status", card).textContent = `heat map unavailable: ${err.message}`;
      card.dataset.state = "heatmap-failed";
    }
  }
}

async function classifyAll(files) {
  const queue = Array.from(files);
  const worker = async () => {
    while (queue.length) await classify(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(CONCURRENCY, queue.length) }, worker));
}

// ---- input -----------------------------------------------------------------------------
$("#files").addEventListener("change", (ev) => {
  classifyAll(ev.target.files);
  ev.target.value = "";
});
const drop = $("#drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  classifyAll(ev.dataTransfer.files);
});

loadModelCard();
