// lookalike page: choose an image, see its fingerprint and its most similar images.
"use strict";

const NEIGHBOURS = 20;
const $ = (id) => document.getElementById(id);
let current = null; // the ImageDetail shown, or null while an upload is shown

// --- talking to the API ---------------------------------------------------------------

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${detail} (HTTP ${response.status})`);
  }
  return body;
}

const imageUrl = (id, what) => `/api/images/${id}/${what}`;
const thumbnailUrl = (id, size) => imageUrl(id, `thumbnail?size=${size}`);

// --- the URL says which image is current, so it can be shared ----------------------------

function idFromLocation() {
  const fromQuery = new URLSearchParams(window.location.search).get("id");
  const fromHash = window.location.hash.replace(/^#/, "");
  const raw = fromQuery || fromHash;
  return /^[1-9][0-9]*$/.test(raw || "") ? Number(raw) : null;
}

function rememberInUrl(id) {
  const target = `?id=${id}`;
  if (window.location.search !== target || window.location.hash) {
    history.pushState({ id }, "", target);
  }
}

// --- rendering ---------------------------------------------------------------------------

function showMessage(text) {
  $("message").textContent = text || "";
}

function describe(image) {
  const parts = [`#${image.id}`];
  if (image.width && image.height) parts.push(`${image.width}\u00d7${image.height}`);
  if (image.status !== "ok") parts.push(image.status + (image.error ? `: ${image.error}` : ""));
  return parts.join(" \u00b7 ");
}

function renderCurrent(image) {
  $("current").hidden = false;
  $("current-image").src = thumbnailUrl(image.id, 512);
  $("current-image").alt = image.file_name;
  $("current-link").href = imageUrl(image.id, "file");
  $("current-name").textContent = image.file_name;
  $("current-meta").textContent = describe(image);
  $("fingerprint-figure").hidden = image.status !== "ok";
  if (image.status === "ok") $("current-fingerprint").src = imageUrl(image.id, "fingerprint.svg");
  $("previous").disabled = image.previous_id === null;
  $("next").disabled = image.next_id === null;
  document.title = `${image.file_name} \u2013 lookalike`;
}

function renderUpload(file) {
  $("current").hidden = false;
  $("current-image").src = URL.createObjectURL(file);
  $("current-image").alt = file.name;
  $("current-link").removeAttribute("href");
  $("current-name").textContent = `Your upload: ${file.name}`;
  $("current-meta").textContent = `${Math.round(file.size / 1024)} kB`;
  $("fingerprint-figure").hidden = true;
  document.title = "Your upload \u2013 lookalike";
}

// Three significant digits: distances range from about 0.001 (random weights) to 100s.
const formatDistance = (distance) => String(Number(distance.toPrecision(3)));

function neighbourItem(neighbour) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "neighbour";
  button.dataset.id = String(neighbour.id);
  button.title = neighbour.file_name;
  const img = document.createElement("img");
  img.src = thumbnailUrl(neighbour.id, 256);
  img.alt = neighbour.file_name;
  const distance = document.createElement("span");
  distance.className = "distance";
  distance.textContent = `${neighbour.rank}. distance ${formatDistance(neighbour.distance)}`;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = neighbour.file_name;
  button.append(img, distance, name);
  button.addEventListener("click", () => showImage(neighbour.id));
  item.append(button);
  return item;
}

function renderNeighbours(neighbours, title) {
  $("neighbours-title").hidden = false;
  $("neighbours-title").textContent = neighbours.length ? title : "No similar images stored yet";
  $("neighbours").replaceChildren(...neighbours.map(neighbourItem));
}

// --- actions -----------------------------------------------------------------------------

async function showImage(id, { push = true } = {}) {
  showMessage("");
  try {
    const image = await fetchJson(`/api/images/${id}`);
    current = image;
    renderCurrent(image);
    if (push) rememberInUrl(id);
    const neighbours = await fetchJson(`/api/images/${id}/neighbours`);
    renderNeighbours(neighbours, `The ${neighbours.length} most similar`);
  } catch (error) {
    showMessage(`Image ${id}: ${error.message}`);
  }
}

async function showFirstImage() {
  const page = await fetchJson("/api/images?limit=1");
  if (page.items.length === 0) {
    showMessage("No images indexed yet: run `lookalike index FOLDER` first.");
    return;
  }
  current = null;
  await showImage(page.items[0].id, { push: false });
  history.replaceState({ id: page.items[0].id }, "", `?id=${page.items[0].id}`);
}

async function showRandomImage() {
  try {
    const first = await fetchJson("/api/images?limit=1");
    if (first.total === 0) return showMessage("No images indexed yet.");
    const offset = Math.floor(Math.random() * first.total);
    const page = await fetchJson(`/api/images?limit=1&offset=${offset}`);
    if (page.items.length) await showImage(page.items[0].id);
  } catch (error) {
    showMessage(error.message);
  }
}

async function searchByPath(event) {
  event.preventDefault();
  const query = $("path-query").value.trim();
  const results = $("path-results");
  if (!query) {
    results.hidden = true;
    return;
  }
  try {
    const page = await fetchJson(`/api/images?limit=50&q=${encodeURIComponent(query)}`);
    const shown = page.items.length < page.total ? ` (first ${page.items.length})` : "";
    $("path-results-title").textContent = `${page.total} paths contain \u201c${query}\u201d${shown}`;
    $("path-results-list").replaceChildren(...page.items.map((image) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = image.file_name;
      button.addEventListener("click", () => {
        results.hidden = true;
        showImage(image.id);
      });
      item.append(button);
      return item;
    }));
    results.hidden = false;
  } catch (error) {
    showMessage(error.message);
  }
}

async function searchByUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  showMessage("Searching\u2026");
  const form = new FormData();
  form.append("file", file);
  try {
    const neighbours = await fetchJson(`/api/search?k=${NEIGHBOURS}`, { method: "POST", body: form });
    current = null;
    renderUpload(file);
    history.pushState({ upload: true }, "", window.location.pathname);
    renderNeighbours(neighbours, `The ${neighbours.length} most similar to your upload`);
    showMessage("");
  } catch (error) {
    showMessage(`Upload: ${error.message}`);
  } finally {
    $("upload").value = "";
  }
}

async function loadStats() {
  try {
    const stats = await fetchJson("/api/stats");
    const model = stats.model ? ` \u00b7 ${stats.model}, weights ${stats.weights}` : "";
    $("stats").textContent = `${stats.images} images (${stats.ok} indexed)${model}`;
  } catch (error) {
    $("stats").textContent = `Statistics unavailable: ${error.message}`;
  }
}

function start() {
  $("previous").addEventListener("click", () => current && showImage(current.previous_id));
  $("next").addEventListener("click", () => current && showImage(current.next_id));
  $("random").addEventListener("click", showRandomImage);
  $("path-search").addEventListener("submit", searchByPath);
  $("upload").addEventListener("change", searchByUpload);
  window.addEventListener("popstate", () => {
    const id = idFromLocation();
    if (id !== null) showImage(id, { push: false });
  });
  loadStats();
  const id = idFromLocation();
  const first = id === null ? showFirstImage() : showImage(id, { push: false });
  first.catch((error) => showMessage(error.message));
}

start();
