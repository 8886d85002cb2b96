// lookalike page: choose an image, see its fingerprint and its most similar images.
"use strict";

const NEIGHBOURS = 20;
const NO_IMAGES = "No images indexed yet: run `lookalike process FOLDER` first.";
const $ = (id) => document.getElementById(id);
let current = null; // the ImageDetail shown, or null while an upload is shown

// One request at a time fills the page. Starting another (a click, an upload, Back) aborts
// the one before, so a slow older answer never overwrites a newer one. Path searches fill
// their own list and take turns among themselves.
let pageRequest = null;
let pathRequest = null;

function takeTurn(previous) {
  if (previous) previous.abort();
  return new AbortController();
}

function newPageRequest() {
  pageRequest = takeTurn(pageRequest);
  return pageRequest.signal;
}

// --- talking to the API ---------------------------------------------------------------

// Rejects with an AbortError once options.signal is aborted, even after the answer arrived.
async function fetchJson(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (options.signal) options.signal.throwIfAborted();
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${detail}${retryAdvice(response)} (HTTP ${response.status})`);
  }
  return body;
}

// A refusal for load (429, 503) says how long to wait; the message passes that on.
function retryAdvice(response) {
  const seconds = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  if (![429, 503].includes(response.status) || !(seconds > 0)) return "";
  return ` \u2014 please try again in ${seconds} second${seconds === 1 ? "" : "s"}`;
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

// how: "push" a new history entry, "replace" the current one, or "keep" the URL as it is.
function rememberInUrl(id, how) {
  const target = `?id=${id}`;
  if (how === "replace") history.replaceState({ id }, "", target);
  else if (how === "push" && (window.location.search !== target || window.location.hash)) {
    history.pushState({ id }, "", target);
  }
}

// --- rendering ---------------------------------------------------------------------------

function showMessage(text) {
  $("message").textContent = text || "";
}

// Screen readers hear one sentence per change (a polite live region); the list itself is
// not live, so each neighbour is read once, when the reader reaches it.
function announce(text) {
  $("announcement").textContent = text;
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
  $("map-link").href = `/map?id=${image.id}`; // the map opens with this image picked out
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

// The button's name is "RANK. distance D FILE": the file name once (the thumbnail's alt is
// empty, the tooltip sits on the name itself, which may be cut short on screen).
function neighbourItem(neighbour) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "neighbour";
  button.dataset.id = String(neighbour.id);
  const img = document.createElement("img");
  img.src = thumbnailUrl(neighbour.id, 256);
  img.alt = "";
  const distance = document.createElement("span");
  distance.className = "distance";
  distance.textContent = `${neighbour.rank}. distance ${formatDistance(neighbour.distance)}`;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = neighbour.file_name;
  name.title = neighbour.file_name;
  button.append(img, distance, name);
  button.addEventListener("click", () => showImage(neighbour.id));
  item.append(button);
  return item;
}

function renderNeighbours(neighbours, title, subject) {
  const list = $("neighbours");
  const focusWasInList = list.contains(document.activeElement);
  const heading = neighbours.length ? title : "No similar images stored yet";
  $("neighbours-title").hidden = false;
  $("neighbours-title").textContent = heading;
  list.replaceChildren(...neighbours.map(neighbourItem));
  announce(`${subject}. ${heading}.`);
  // The clicked neighbour is gone with the old list: keep keyboard users on the new image.
  if (focusWasInList) $("current-name").focus();
}

// --- actions -----------------------------------------------------------------------------

// how: how the URL follows (see rememberInUrl).
async function showImage(id, { how = "push" } = {}) {
  const signal = newPageRequest();
  showMessage("");
  try {
    const image = await fetchJson(`/api/images/${id}`, { signal });
    current = image;
    renderCurrent(image);
    rememberInUrl(id, how);
    const neighbours = await fetchJson(`/api/images/${id}/neighbours`, { signal });
    renderNeighbours(neighbours, `The ${neighbours.length} most similar`, image.file_name);
  } catch (error) {
    if (!signal.aborted) showMessage(`Image ${id}: ${error.message}`);
  }
}

// The image at offset (id order), or the message for an empty collection.
async function showImageAt(offset, how) {
  const signal = newPageRequest();
  try {
    const page = await fetchJson(`/api/images?limit=1&offset=${offset}`, { signal });
    if (page.items.length === 0) return showMessage(NO_IMAGES);
    await showImage(page.items[0].id, { how });
  } catch (error) {
    if (!signal.aborted) showMessage(error.message);
  }
}

async function showRandomImage() {
  const signal = newPageRequest();
  try {
    const first = await fetchJson("/api/images?limit=1", { signal });
    if (first.total === 0) return showMessage(NO_IMAGES);
    await showImageAt(Math.floor(Math.random() * first.total), "push");
  } catch (error) {
    if (!signal.aborted) showMessage(error.message);
  }
}

async function searchByPath(event) {
  event.preventDefault();
  const query = $("path-query").value.trim();
  const results = $("path-results");
  pathRequest = takeTurn(pathRequest);
  const signal = pathRequest.signal;
  if (!query) {
    results.hidden = true;
    return;
  }
  try {
    const url = `/api/images?limit=50&q=${encodeURIComponent(query)}`;
    const page = await fetchJson(url, { signal });
    const shown = page.items.length < page.total ? ` (first ${page.items.length})` : "";
    const title = `${page.total} paths contain \u201c${query}\u201d${shown}`;
    $("path-results-title").textContent = title;
    announce(title + ".");
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
    if (!signal.aborted) showMessage(error.message);
  }
}

async function searchByUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  const signal = newPageRequest();
  showMessage("Searching\u2026");
  const form = new FormData();
  form.append("file", file);
  try {
    const url = `/api/search?k=${NEIGHBOURS}`;
    const neighbours = await fetchJson(url, { method: "POST", body: form, signal });
    current = null;
    renderUpload(file);
    history.pushState({ upload: true }, "", window.location.pathname);
    const title = `The ${neighbours.length} most similar to your upload`;
    renderNeighbours(neighbours, title, `Your upload ${file.name}`);
    showMessage("");
  } catch (error) {
    if (!signal.aborted) showMessage(`Upload: ${error.message}`);
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
    if (id !== null) showImage(id, { how: "keep" });
  });
  loadStats();
  const id = idFromLocation();
  if (id === null) showImageAt(0, "replace");
  else showImage(id, { how: "keep" });
}

start();
