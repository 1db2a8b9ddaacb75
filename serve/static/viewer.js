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

async function pollExplanation(card, url) {
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
    const [base, heat] = await Promise.all([
      fetchBlobUrl(`${url}.png?kind=image`),
      fetchBlobUrl(`${url}.png?kind=heatmap`),
    ]);
    const baseImg = $(".base", card);
    const heatImg = $(".heat", card);
    await Promise.all([
      new Promise((r) => { baseImg.onload = r; baseImg.src = base; }),
      new Promise((r) => { heatImg.onload = r; heatImg.src = heat; }),
    ]);
    const slider = $(".opacity", card);
    const apply = () => { heatImg.style.opacity = String(slider.value / 100); };
    slider.addEventListener("input", apply);
    apply();
    $(".opacity-label", card).hidden = false;
    status.textContent = `heat map for ${body.target_class} (GradCAM++, model input 224x224)`;
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
  if (/^image\/(png|jpeg)$/.test(file.type)) $(".base", card).src = URL.createObjectURL(file);

  const explain = $("#explain").checked;
  let resp;
  try {
    resp = await fetch(`/v1/predict${explain ? "?explain=true" : ""}`, {
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
  card.dataset.state = "classified";
  if (!validatedClasses) loadModelCard();
  if (result.explanation_url) {
    try {
      await pollExplanation(card, result.explanation_url);
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
