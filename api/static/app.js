// lookalike page: choose an image, see its fingerprint and its most similar images;
// signed-in curators judge each pair (same object, similar, not similar).
"use strict";

const NEIGHBOURS = 20;
const NO_IMAGES = "No images indexed yet: run `lookalike process FOLDER` first.";
const NOT_WRITABLE = "Judgements cannot be saved: this server does not accept judgements.";
const $ = (id) => document.getElementById(id);
let current = null; // the ImageDetail shown, or null while an upload is shown
let session = null; // GET /api/session's answer; null until it came, or when it failed
let notWritable = null; // a save's 503 detail: the server cannot save judgements after all
let pageStarted = false; // false while the archive waits for a sign-in to be read

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
  return (await fetchAnswer(url, options)).body;
}

// The JSON body and the headers (the neighbours' X-Neighbours-Short is one).
async function fetchAnswer(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (options.signal) options.signal.throwIfAborted();
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const error = new Error(`${detail}${retryAdvice(response)} (HTTP ${response.status})`);
    // Callers that react to one status (401, 503) need it, and the bare detail, apart.
    error.status = response.status;
    error.detail = detail;
    throw error;
  }
  return { body, headers: response.headers };
}

// A refusal for load (429, 503) says how long to wait; the message passes that on.
function retryAdvice(response) {
  const seconds = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  if (![429, 503].includes(response.status) || !(seconds > 0)) return "";
  return ` \u2014 please try again in ${seconds} second${seconds === 1 ? "" : "s"}`;
}

// The server checks every state-changing request for the CSRF cookie's value in a header
// (double submit): a forged request from another site carries the cookie but cannot read it.
function csrfHeaders() {
  const match = document.cookie.match(/(?:^|;\s*)lookalike_csrf=([^;]*)/);
  return match ? { "X-CSRF-Token": match[1] } : {};
}

// Every POST, PUT and DELETE goes through here, so none lacks the CSRF header.
// json, when given, is the body; body is sent as it is (a FormData).
async function send(method, url, { json, body, signal } = {}) {
  // Any GET sets the cookie; should none have been answered yet, one is asked for first.
  if (!("X-CSRF-Token" in csrfHeaders())) await fetch("/api/session").catch(() => null);
  const headers = csrfHeaders();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  return fetchJson(url, { method, headers, body, signal });
}

const imageUrl = (id, what) => `/api/images/${id}/${what}`;
const thumbnailUrl = (id, size) => imageUrl(id, `thumbnail?size=${size}`);
const judgementUrl = (id, neighbourId) => imageUrl(id, `neighbours/${neighbourId}/judgement`);

// The source the page is filtered to ("" for all): the image list, browsing and neighbours.
const chosenSource = () => $("source-filter").value;

// Query parameters with the chosen source added, as a "?..." string ("" when there are none).
function withSource(params = {}) {
  const query = new URLSearchParams(params);
  if (chosenSource()) query.set("source", chosenSource());
  const text = query.toString();
  return text ? `?${text}` : "";
}

const hidingNotSimilar = () => signedIn() && $("hide-not-similar").checked;

function neighboursUrl(id) {
  return imageUrl(id, "neighbours") + withSource(hidingNotSimilar() ? { hide: "not_similar" } : {});
}

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
  const parts = [`#${image.id}`, `source ${image.source}`];
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
// imageId: the image these are the neighbours of, whom the verdicts are about; null for an
// upload's, which no one can judge.
function neighbourItem(neighbour, imageId) {
  const item = document.createElement("li");
  item.dataset.neighbour = String(neighbour.id);
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
  button.append(img, distance, name, sourceLabel(neighbour.source));
  button.addEventListener("click", () => showImage(neighbour.id));
  item.append(button);
  if (imageId !== null) {
    // Beside the card's button, not in it: a button inside a button is not allowed.
    const counts = document.createElement("p");
    counts.className = "verdicts muted";
    counts.title = "Curators' verdicts on this pair";
    item.append(counts);
    if (canJudge()) item.append(judgementControls(item, neighbour, imageId));
    updateCard(item, neighbour);
  }
  return item;
}

// "source NAME" to a screen reader; the name alone, as a tag, on screen.
function sourceLabel(source) {
  const label = document.createElement("span");
  label.className = "source";
  const word = document.createElement("span");
  word.className = "visually-hidden";
  word.textContent = "source ";
  label.append(word, source);
  return label;
}

const VERDICTS = [
  ["same_object", "Same object"],
  ["similar", "Similar"],
  ["not_similar", "Not similar"],
];

// "same object 1 · similar 0 · not similar 2", or "" while nobody has judged the pair.
function verdictSummary(counts) {
  if (!counts || !VERDICTS.some(([key]) => counts[key] > 0)) return "";
  return VERDICTS.map(([key, label]) => `${label.toLowerCase()} ${counts[key]}`).join(" \u00b7 ");
}

// Three toggle buttons (pressing the pressed one clears it), Clear, and an optional note.
function judgementControls(item, neighbour, imageId) {
  const group = document.createElement("div");
  group.className = "judge";
  group.setAttribute("role", "group");
  group.setAttribute("aria-label", `Your verdict on ${neighbour.file_name}`);
  const note = document.createElement("input");
  note.type = "text";
  note.className = "note";
  note.maxLength = 500;
  note.placeholder = "Note (optional)";
  note.setAttribute("aria-label", "Note with your verdict (optional)");
  note.value = neighbour.my_note || ""; // the caller's own note, as saved
  const mine = () => item.dataset.myVerdict || null;
  for (const [verdict, label] of VERDICTS) {
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.dataset.verdict = verdict;
    toggle.textContent = label;
    toggle.addEventListener("click", () => {
      judge(item, imageId, neighbour, mine() === verdict ? null : verdict, note.value);
    });
    group.append(toggle);
  }
  const clear = document.createElement("button");
  clear.type = "button";
  clear.className = "clear";
  clear.textContent = "Clear";
  clear.addEventListener("click", () => judge(item, imageId, neighbour, null, ""));
  // Enter in the note saves it with the verdict already given (a toggle would clear it).
  note.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !mine()) return;
    event.preventDefault();
    judge(item, imageId, neighbour, mine(), note.value);
  });
  group.append(clear, note);
  return group;
}

// Counts, pressed states and Clear from a fresh answer, in place: focus stays where it is.
function updateCard(item, neighbour) {
  item.neighbour = neighbour; // kept for redrawing the card (see judgementFailed)
  const counts = item.querySelector(".verdicts");
  counts.textContent = verdictSummary(neighbour.verdicts);
  counts.hidden = counts.textContent === "";
  item.dataset.myVerdict = neighbour.my_verdict || "";
  for (const toggle of item.querySelectorAll("[data-verdict]")) {
    toggle.setAttribute("aria-pressed", String(toggle.dataset.verdict === neighbour.my_verdict));
  }
  const clear = item.querySelector(".clear");
  if (!clear) return;
  const hadFocus = document.activeElement === clear;
  clear.hidden = !neighbour.my_verdict;
  if (hadFocus && clear.hidden) item.querySelector("[data-verdict]").focus();
}

function fillList(neighbours, imageId) {
  $("neighbours").replaceChildren(...neighbours.map((n) => neighbourItem(n, imageId)));
}

// imageId: the image they are the neighbours of, or null for an upload's.
function renderNeighbours(neighbours, title, subject, imageId) {
  const list = $("neighbours");
  const focusWasInList = list.contains(document.activeElement);
  const within = imageId !== null && chosenSource() ? ` in \u201c${chosenSource()}\u201d` : "";
  const heading = neighbours.length
    ? title
    : within ? `No similar images${within}` : "No similar images stored yet";
  $("neighbours-title").hidden = false;
  $("neighbours-title").textContent = heading;
  $("neighbours-short").hidden = true; // renderShort says it again where it still holds
  fillList(neighbours, imageId);
  renderJudging();
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
    // With a source chosen, Previous and Next stay within it.
    const image = await fetchJson(`/api/images/${id}${withSource()}`, { signal });
    current = image;
    renderCurrent(image);
    rememberInUrl(id, how);
    await showNeighbours(image, signal);
  } catch (error) {
    if (!signal.aborted) showMessage(`Image ${id}: ${error.message}`);
  }
}

async function showNeighbours(image, signal) {
  const { body: neighbours, headers } = await fetchAnswer(neighboursUrl(image.id), { signal });
  renderNeighbours(neighbours, neighboursTitle(neighbours), image.file_name, image.id);
  renderShort(headers, image);
}

function neighboursTitle(neighbours) {
  const within = chosenSource() ? ` in \u201c${chosenSource()}\u201d` : "";
  return `The ${neighbours.length} most similar${within}`;
}

// One line when a filter left fewer neighbours than asked for (X-Neighbours-Short).
function renderShort(headers, image) {
  const short = headers ? headers.get("X-Neighbours-Short") : null;
  const line = $("neighbours-short");
  line.hidden = short === null;
  if (short === null) return;
  const count = Number(short) === 0 ? "None" : `Only ${short}`;
  const hidden = hidingNotSimilar() ? " once the pairs you marked not similar are hidden" : "";
  const source = `\u201c${chosenSource()}\u201d`;
  line.textContent = chosenSource()
    ? `${count} of the ${image.neighbour_count} stored similar images are in ${source}${hidden}.`
    : `${count} of the similar images are left${hidden}.`;
}

// The current image's neighbours again: who is signed in, or what is hidden, has changed.
async function reloadNeighbours() {
  if (!current) return renderJudging(); // an upload's neighbours carry no verdicts
  const image = current;
  const signal = newPageRequest();
  try {
    await showNeighbours(image, signal);
  } catch (error) {
    if (!signal.aborted) showMessage(`Image ${image.id}: ${error.message}`);
  }
}

// The image at offset (id order), or the message for an empty collection.
// Nothing to show: the whole archive is empty, or the chosen source is.
function noImages() {
  return chosenSource() ? `No images in \u201c${chosenSource()}\u201d yet.` : NO_IMAGES;
}

async function showImageAt(offset, how) {
  const signal = newPageRequest();
  try {
    const page = await fetchJson(`/api/images${withSource({ limit: 1, offset })}`, { signal });
    if (page.items.length === 0) return showMessage(noImages());
    await showImage(page.items[0].id, { how });
  } catch (error) {
    if (!signal.aborted) showMessage(error.message);
  }
}

async function showRandomImage() {
  const signal = newPageRequest();
  try {
    const first = await fetchJson(`/api/images${withSource({ limit: 1 })}`, { signal });
    if (first.total === 0) return showMessage(noImages());
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
    const page = await fetchJson(`/api/images${withSource({ limit: 50, q: query })}`, { signal });
    const shown = page.items.length < page.total ? ` (first ${page.items.length})` : "";
    const within = chosenSource() ? ` in \u201c${chosenSource()}\u201d` : "";
    const title = `${page.total} paths contain \u201c${query}\u201d${within}${shown}`;
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
      item.append(button, " ", sourceLabel(image.source)); // beside it: the name stays the path
      return item;
    }));
    results.hidden = false;
  } catch (error) {
    if (!signal.aborted) showMessage(error.message);
  }
}

function renderTextQuery(text) {
  $("current").hidden = false;
  $("current-image").removeAttribute("src");
  $("current-image").alt = "";
  $("current-link").removeAttribute("href");
  $("current-name").textContent = `Your words: \u201c${text}\u201d`;
  $("current-meta").textContent = "";
  $("fingerprint-figure").hidden = true;
  document.title = "Search in words \u2013 lookalike";
}

// Ranked by the model's text tower against every stored image, as an upload is.
async function searchByText(event) {
  event.preventDefault();
  const text = $("text-query").value.trim();
  if (!text) return;
  const signal = newPageRequest();
  showMessage("Searching\u2026");
  try {
    const query = new URLSearchParams({ text, k: String(NEIGHBOURS) });
    const neighbours = await fetchJson(`/api/search?${query}`, { signal });
    current = null;
    renderTextQuery(text);
    history.pushState({ text }, "", window.location.pathname);
    const title = `The ${neighbours.length} images nearest to your words`;
    renderNeighbours(neighbours, title, `Your words ${text}`, null);
    showMessage("");
  } catch (error) {
    if (!signal.aborted) showMessage(`Search in words: ${error.message}`);
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
    const neighbours = await send("POST", url, { body: form, signal });
    current = null;
    renderUpload(file);
    history.pushState({ upload: true }, "", window.location.pathname);
    const title = `The ${neighbours.length} most similar to your upload`;
    renderNeighbours(neighbours, title, `Your upload ${file.name}`, null);
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
    // The CLI says the same after a run: random features make every similarity arbitrary.
    const random = Boolean(stats.weights && stats.weights.startsWith("none"));
    $("random-weights").hidden = !random;
    $("text-search").hidden = !stats.text_search;
  } catch (error) {
    $("stats").textContent = `Statistics unavailable: ${error.message}`;
  }
}

// --- judgements --------------------------------------------------------------------------

const signedIn = () => Boolean(session && session.signed_in);
const canJudge = () => signedIn() && session.writable && notWritable === null;

// Sets the caller's verdict on the pair (null clears it), then fetches the counts afresh.
async function judge(item, imageId, neighbour, verdict, note) {
  if (item.getAttribute("aria-busy") === "true") return; // one change per card at a time
  // Another image or an upload (a newer page request) makes this card's answer stale.
  const signal = pageRequest.signal;
  const url = judgementUrl(imageId, neighbour.id);
  item.setAttribute("aria-busy", "true");
  try {
    if (verdict === null) await send("DELETE", url);
    else await send("PUT", url, { json: { verdict, note: note.trim() || undefined } });
    if (signal.aborted) return;
    const given = VERDICTS.find(([key]) => key === verdict);
    announce(`${neighbour.file_name}: ${given ? `marked ${given[1].toLowerCase()}` : "verdict cleared"}.`);
    await refreshCards(imageId, signal);
  } catch (error) {
    if (!signal.aborted) judgementFailed(error);
  } finally {
    item.removeAttribute("aria-busy");
  }
}

function judgementFailed(error) {
  if (error.status === 503 && /^judgements cannot be saved/i.test(error.detail)) {
    // No writer database after all: the controls go, the line says why.
    notWritable = error.detail;
    const shown = [...$("neighbours").children].map((item) => item.neighbour);
    fillList(shown, current ? current.id : null);
    renderJudging();
  } else if (error.status === 401) {
    loadSession().then(reloadNeighbours); // the session ended: show the page signed out
  }
  showMessage(`Judgement not saved: ${error.message}`);
}

// Fresh counts for the cards shown; when the list itself changed (a pair now hidden, so
// another takes its place), it is drawn anew.
async function refreshCards(imageId, signal) {
  const { body: neighbours, headers } = await fetchAnswer(neighboursUrl(imageId), { signal });
  if (current && current.id === imageId) renderShort(headers, current);
  const items = [...$("neighbours").children];
  const unchanged = neighbours.length === items.length
    && neighbours.every((n, i) => items[i].dataset.neighbour === String(n.id));
  if (unchanged) {
    neighbours.forEach((n, i) => updateCard(items[i], n));
    return;
  }
  const focusWasInList = $("neighbours").contains(document.activeElement);
  fillList(neighbours, imageId);
  $("neighbours-title").textContent = neighboursTitle(neighbours);
  if (focusWasInList) $("current-name").focus(); // the focused card may be gone
}

// The hide option and, where judgements cannot be saved, why: for signed-in users only.
function renderJudging() {
  $("judging").hidden = !(signedIn() && current !== null && !$("neighbours-title").hidden);
  const why = signedIn() && !canJudge() ? notWritable || NOT_WRITABLE : "";
  // The server's detail starts in lower case ("judgements cannot be saved: ..."): a sentence.
  $("judging-note").textContent = why.charAt(0).toUpperCase() + why.slice(1);
  $("judging-note").hidden = !why;
}

// --- signing in and out ------------------------------------------------------------------

function accountMessage(text) {
  $("account-message").textContent = text || "";
}

async function loadSession() {
  try {
    session = await fetchJson("/api/session");
  } catch (error) {
    session = null;
    accountMessage(`Signing in is unavailable: ${error.message}`);
  }
  renderAccount();
}

function renderAccount() {
  const offered = Boolean(session && session.sign_in_offered);
  $("sign-in-toggle").hidden = signedIn() || !offered;
  $("signed-in").hidden = !signedIn();
  $("signed-in-as").textContent = signedIn() ? `Signed in as ${session.name} (${session.role})` : "";
  if (signedIn() || !offered) showSignIn(false);
}

function showSignIn(open) {
  $("sign-in").hidden = !open;
  $("sign-in-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("sign-in-token").focus();
}

// One form: the token when one is given, else the name and password.
function credentials() {
  const token = $("sign-in-token").value.trim();
  if (token) return { token };
  const name = $("sign-in-name").value.trim();
  const password = $("sign-in-password").value;
  return name && password ? { name, password } : null;
}

async function signIn(event) {
  event.preventDefault();
  const given = credentials();
  if (!given) return accountMessage("Enter a token, or a name and a password.");
  accountMessage("Signing in\u2026");
  try {
    session = await send("POST", "/api/session", { json: given });
  } catch (error) {
    return accountMessage(`Sign-in failed: ${error.message}`);
  }
  $("sign-in-token").value = "";
  $("sign-in-password").value = "";
  notWritable = null;
  renderAccount();
  accountMessage("");
  $("sign-out").focus(); // the form that had focus is gone; its successor is Sign out
  if (!pageStarted) {
    showMessage("");
    startPage(); // the archive needed an account to be read
  } else {
    reloadNeighbours(); // now with this user's verdicts and controls
  }
}

async function signOut() {
  try {
    await send("DELETE", "/api/session");
  } catch (error) {
    return accountMessage(`Sign-out failed: ${error.message}`);
  }
  // Where reading needs an account, nothing of the archive may stay: start over.
  if (session && session.read_requires_login) return window.location.reload();
  await loadSession();
  accountMessage("Signed out.");
  $("sign-in-toggle").focus();
  reloadNeighbours(); // without this user's verdicts and controls
}

// --- start -------------------------------------------------------------------------------

// The source filter, offered where the archive has more than one source.
async function loadSources() {
  try {
    const sources = await fetchJson("/api/sources");
    const options = sources.map((source) => {
      const option = document.createElement("option");
      option.value = source.name;
      option.textContent = `${source.name} (${source.images})`;
      return option;
    });
    $("source-filter").append(...options);
    $("source-choice").hidden = sources.length < 2;
  } catch (error) {
    $("source-choice").hidden = true; // the other requests say what is wrong
  }
}

// A new source choice: the current image again (its neighbours, Previous and Next within the
// source), and the path search's results again.
function chooseSource() {
  if (!$("path-results").hidden) $("path-search").requestSubmit();
  if (current) showImage(current.id, { how: "keep" });
  else if ($("current").hidden) showImageAt(0, "replace");
  // An upload's or words' answers come from every source: they stay.
}

// Stats and the first image: at once, or once signed in where reading needs an account.
function startPage() {
  pageStarted = true;
  loadStats();
  loadSources();
  const id = idFromLocation();
  if (id === null) showImageAt(0, "replace");
  else showImage(id, { how: "keep" });
}

async function start() {
  $("previous").addEventListener("click", () => current && showImage(current.previous_id));
  $("next").addEventListener("click", () => current && showImage(current.next_id));
  $("random").addEventListener("click", showRandomImage);
  $("path-search").addEventListener("submit", searchByPath);
  $("upload").addEventListener("change", searchByUpload);
  $("text-search").addEventListener("submit", searchByText);
  $("sign-in-toggle").addEventListener("click", () => showSignIn($("sign-in").hidden));
  $("sign-in-cancel").addEventListener("click", () => {
    showSignIn(false);
    $("sign-in-toggle").focus();
  });
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("hide-not-similar").addEventListener("change", reloadNeighbours);
  $("source-filter").addEventListener("change", chooseSource);
  window.addEventListener("popstate", () => {
    const id = idFromLocation();
    if (id !== null) showImage(id, { how: "keep" });
  });
  await loadSession();
  if (session && session.read_requires_login && !session.signed_in) {
    showMessage("Sign in to see this archive.");
    showSignIn(true);
    return;
  }
  startPage();
}

start();
