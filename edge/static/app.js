// capsedge page: send one X-ray to /api/classify and show the answer.
// Server text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "capsedge-token";
const NO_PREVIEW = /\.(dcm|dicom)$/i;

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function showError(message) {
  $("status").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return "the server answered " + response.status;
}

async function checkServer() {
  let response;
  try {
    response = await fetch("/api/health", { headers: authHeaders() });
  } catch (_) {
    showError("cannot reach the capsedge server");
    return;
  }
  if (response.status === 401) {
    $("token-form").hidden = false;
    return;
  }
  if (!response.ok) { showError(await errorMessage(response)); return; }
  $("token-form").hidden = true;
  const health = await response.json();
  $("model").textContent = "Model " + health.model_version + " · " + health.labels.join(", ");
}

function showPreview(file) {
  const img = $("preview");
  const note = $("no-preview");
  if (img.src) URL.revokeObjectURL(img.src);
  const showNote = () => { img.hidden = true; img.removeAttribute("src"); note.hidden = false; };
  if (NO_PREVIEW.test(file.name) || file.type === "application/dicom") { showNote(); return; }
  img.onerror = showNote;
  img.hidden = false;
  note.hidden = true;
  img.src = URL.createObjectURL(file);
}

function percent(p) { return (100 * p).toFixed(1) + " %"; }

// The explanation may be a PNG data URL or a path on this server, nothing else.
function explanationSource(value) {
  if (typeof value !== "string") return null;
  if (value.startsWith("data:image/png;base64,")) return value;
  if (value.startsWith("/") && !value.startsWith("//")) return value;
  return null;
}

function showResult(result) {
  const probabilities = result.probabilities || {};
  // Out of distribution: no maker is the answer; the page leads with what the image is not.
  const outside = result.out_of_distribution === true;
  $("label").textContent = outside ? "Not a shoulder-implant X-ray" : result.label;
  $("confidence").textContent = !outside && result.label in probabilities
    ? percent(probabilities[result.label]) : "";
  $("label-line").dataset.state = outside ? "outside" : result.uncertain === true ? "uncertain"
    : result.uncertain === null || result.uncertain === undefined ? "uncalibrated" : "confident";

  // Confidence flags, in large print beside the answer.
  $("uncertain").hidden = outside || result.uncertain !== true;
  $("uncalibrated").hidden = outside || result.uncertain === true || result.uncertain === false;
  const caution = $("caution");
  caution.hidden = outside || result.uncertain === false;
  caution.textContent = result.uncertain === true
    ? "Uncertain: the model's confidence is below " +
      (typeof result.threshold === "number" ? percent(result.threshold) : "its threshold") +
      ", the least at which its answers held up in cross-validation. Confirm by other means."
    : "Uncalibrated: this model carries no calibration, so its confidence cannot be trusted " +
      "and nothing tells a safe answer from a guess.";
  const ood = $("ood");
  ood.hidden = !outside;
  ood.textContent = "This image does not look like the X-rays the model was trained on" +
    (result.ood_reason ? ": " + result.ood_reason : "") + ". The model gives no maker for it.";
  $("bars-caption").hidden = !outside;

  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("li");
    if (name === result.label && !outside) row.className = "top";
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = Math.max(0, Math.min(100, 100 * p)) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = percent(p);
    row.append(label, track, value);
    bars.append(row);
  }
  $("meta").textContent = "Took " + Number(result.latency_ms).toFixed(0) + " ms on the server" +
    (result.model_version ? " · model " + result.model_version : "");

  const source = explanationSource(result.explanation);
  $("explanation").hidden = source === null;
  if (source !== null) $("explanation-img").src = source;
  else $("explanation-img").removeAttribute("src");

  $("result").hidden = false;
  $("result").dataset.state = "done";
}

async function classify(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("result").dataset.state = "busy";
  $("status").textContent = "Classifying " + file.name + " …";
  showPreview(file);
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    const url = $("explain").checked ? "/api/classify?explain=1" : "/api/classify";
    response = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
  } catch (_) {
    showError("cannot reach the capsedge server");
    return;
  }
  if (response.status === 401) { $("token-form").hidden = false; }
  if (!response.ok) {
    $("result").dataset.state = "error";
    showError(await errorMessage(response));
    return;
  }
  $("status").textContent = "";
  showResult(await response.json());
}

function setUp() {
  const input = $("file");
  input.addEventListener("change", () => {
    if (input.files.length) classify(input.files[0]);
    input.value = "";
  });
  const drop = $("drop");
  // Dropping a file anywhere on the page classifies it instead of opening it.
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = event.dataTransfer ? event.dataTransfer.files : [];
    if (files.length) classify(files[0]);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("error").hidden = true;
    checkServer();
  });
  checkServer();
}

setUp();
