// The map: every image as a point (WebGL), pan and zoom, photos when close, click to open.
// Points come from /api/map as 12-byte records: uint32 id, float32 x, float32 y.
"use strict";

const $ = (id) => document.getElementById(id);
const RECORD_BYTES = 12;
const THUMBNAILS_BELOW = 60; // photos replace points once fewer than this are on screen
const THUMBNAIL_PIXELS = 64;
// While the map moves, only this many points are drawn (an even sample: the points are kept
// in a shuffled order, the picked-out ones first); all of them once it is still again.
const MOVING_POINTS = 30000;
const STILL_AFTER_MS = 200;

const BASE_COLOUR = [0.25, 0.45, 0.75];
// Ten well-separated colours (Tableau 10); folders beyond the tenth reuse them.
const FOLDER_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const view = { x: 0, y: 0, scale: 1 }; // map point at the canvas centre; pixels per map unit
const map = {
  ids: null, xy: null, count: 0, highlight: new Map(), frames: [], folderOf: null, folders: [],
};
let gl = null;
let program = null;
let drawPending = false;
let moving = false;
let stillTimer = null;

// --- loading --------------------------------------------------------------------------------

async function loadPoints() {
  const response = await fetch("/api/map");
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new Error(body && body.detail ? body.detail : `HTTP ${response.status}`);
  }
  const buffer = await response.arrayBuffer();
  const records = new DataView(buffer);
  map.count = buffer.byteLength / RECORD_BYTES;
  map.ids = new Uint32Array(map.count);
  map.xy = new Float32Array(map.count * 2);
  for (let i = 0; i < map.count; i++) {
    map.ids[i] = records.getUint32(i * RECORD_BYTES, true);
    map.xy[2 * i] = records.getFloat32(i * RECORD_BYTES + 4, true);
    map.xy[2 * i + 1] = records.getFloat32(i * RECORD_BYTES + 8, true);
  }
}

// Shuffle the points (a fixed seed), the picked-out ones first, so that any prefix is an
// even sample of the map.
function shufflePoints() {
  const order = Array.from({ length: map.count }, (_, i) => i);
  let seed = 12345;
  for (let i = map.count - 1; i > 0; i--) {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    const j = seed % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  order.sort((a, b) => map.highlight.has(map.ids[b]) - map.highlight.has(map.ids[a]));
  map.sortedIds = map.ids; // /api/map/folders answers in this order
  const [ids, xy] = [new Uint32Array(map.count), new Float32Array(map.count * 2)];
  order.forEach((from, to) => {
    ids[to] = map.ids[from];
    xy[2 * to] = map.xy[2 * from];
    xy[2 * to + 1] = map.xy[2 * from + 1];
  });
  [map.ids, map.xy] = [ids, xy];
}

async function loadHighlight(id) {
  // The image the visitor came from and its nearest neighbours stand out.
  map.highlight.set(id, [1.0, 0.2, 0.2]);
  const response = await fetch(`/api/images/${id}/neighbours`); // up to 20, as stored
  if (!response.ok) return;
  for (const neighbour of await response.json()) map.highlight.set(neighbour.id, [1.0, 0.7, 0.1]);
}

// Each point's top-level folder (loaded on first use), in /api/map's id order, then shuffled
// like the points.
async function loadFolders() {
  const response = await fetch("/api/map/folders");
  if (!response.ok) throw new Error(`folders: HTTP ${response.status}`);
  const answer = await response.json();
  const byId = new Map();
  answer.points.forEach((folder, i) => byId.set(map.sortedIds[i], folder));
  map.folderOf = Uint32Array.from(map.ids, (id) => byId.get(id));
  map.folders = answer.folders;
}

async function colourByFolder() {
  try {
    if ($("by-folder").checked && !map.folderOf) await loadFolders();
    uploadColours();
    showLegend();
    requestDraw();
  } catch (error) {
    $("message").textContent = `Map: ${error.message}`;
  }
}

function showLegend() {
  const legend = $("legend");
  if (!$("by-folder").checked) return legend.replaceChildren();
  legend.replaceChildren(...map.folders.slice(0, FOLDER_COLOURS.length).map((folder, i) => {
    const item = document.createElement("span");
    item.className = "legend-item";
    item.style.setProperty("--swatch", FOLDER_COLOURS[i]);
    item.textContent = folder || "(top folder)";
    return item;
  }));
}

// --- drawing --------------------------------------------------------------------------------

const VERTEX = `
attribute vec2 position;
attribute vec3 colour;
uniform vec2 centre;
uniform vec2 scale;
uniform float size;
varying vec3 tint;
void main() {
  gl_Position = vec4((position - centre) * scale, 0.0, 1.0);
  gl_PointSize = size;
  tint = colour;
}`;
const FRAGMENT = `
precision mediump float;
varying vec3 tint;
void main() {
  vec2 offset = gl_PointCoord - vec2(0.5);
  if (dot(offset, offset) > 0.25) discard;
  gl_FragColor = vec4(tint, 0.85);
}`;

function compile(type, source) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
  return shader;
}

function setUpGl() {
  const canvas = $("map");
  gl = canvas.getContext("webgl", { antialias: false, alpha: false });
  if (!gl) throw new Error("this browser cannot draw WebGL");
  program = gl.createProgram();
  gl.attachShader(program, compile(gl.VERTEX_SHADER, VERTEX));
  gl.attachShader(program, compile(gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(program);
  gl.useProgram(program);
  upload("position", map.xy, 2);
  uploadColours();
  gl.enable(gl.BLEND);
  gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
}

function rgb(hex) {
  return [1, 3, 5].map((at) => Number.parseInt(hex.slice(at, at + 2), 16) / 255);
}

function uploadColours() {
  const colours = new Float32Array(map.count * 3);
  const byFolder = $("by-folder").checked && map.folderOf;
  const palette = FOLDER_COLOURS.map(rgb);
  for (let i = 0; i < map.count; i++) {
    const tint = map.highlight.get(map.ids[i])
      || (byFolder ? palette[map.folderOf[i] % palette.length] : BASE_COLOUR);
    colours.set(tint, 3 * i);
  }
  upload("colour", colours, 3);
}

function upload(name, values, size) {
  const buffer = gl.createBuffer();
  gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
  gl.bufferData(gl.ARRAY_BUFFER, values, gl.STATIC_DRAW);
  const where = gl.getAttribLocation(program, name);
  gl.enableVertexAttribArray(where);
  gl.vertexAttribPointer(where, size, gl.FLOAT, false, 0, 0);
}

function requestMovingDraw() {
  moving = true;
  clearTimeout(stillTimer);
  stillTimer = setTimeout(() => {
    moving = false;
    requestDraw();
  }, STILL_AFTER_MS);
  requestDraw();
}

function requestDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame((time) => {
    drawPending = false;
    map.frames.push(time);
    draw();
  });
}

function draw() {
  const canvas = $("map");
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) [canvas.width, canvas.height] = [width, height];
  gl.viewport(0, 0, width, height);
  gl.clearColor(0.98, 0.98, 0.97, 1);
  gl.clear(gl.COLOR_BUFFER_BIT);
  gl.uniform2f(gl.getUniformLocation(program, "centre"), view.x, view.y);
  gl.uniform2f(gl.getUniformLocation(program, "scale"),
    (2 * view.scale) / canvas.clientWidth, (2 * view.scale) / canvas.clientHeight);
  const size = Math.min(12, Math.max(2, Math.sqrt(view.scale) * 0.8)) * ratio;
  gl.uniform1f(gl.getUniformLocation(program, "size"), size);
  gl.drawArrays(gl.POINTS, 0, moving ? Math.min(map.count, MOVING_POINTS) : map.count);
  showThumbnails();
}

// --- where things are ----------------------------------------------------------------------

function toScreen(i) {
  const canvas = $("map");
  return [
    canvas.clientWidth / 2 + (map.xy[2 * i] - view.x) * view.scale,
    canvas.clientHeight / 2 - (map.xy[2 * i + 1] - view.y) * view.scale,
  ];
}

function toMap(px, py) {
  const canvas = $("map");
  return [
    view.x + (px - canvas.clientWidth / 2) / view.scale,
    view.y - (py - canvas.clientHeight / 2) / view.scale,
  ];
}

function onScreen() {
  const canvas = $("map");
  const found = [];
  for (let i = 0; i < map.count && found.length <= THUMBNAILS_BELOW; i++) {
    const [sx, sy] = toScreen(i);
    if (sx >= 0 && sy >= 0 && sx <= canvas.clientWidth && sy <= canvas.clientHeight) found.push(i);
  }
  return found;
}

function nearestPoint(px, py, within) {
  let best = -1;
  let bestSquared = within * within;
  for (let i = 0; i < map.count; i++) {
    const [sx, sy] = toScreen(i);
    const squared = (sx - px) ** 2 + (sy - py) ** 2;
    if (squared < bestSquared) [best, bestSquared] = [i, squared];
  }
  return best;
}

function showThumbnails() {
  const layer = $("thumbnails");
  const visible = onScreen();
  if (visible.length > THUMBNAILS_BELOW) {
    layer.replaceChildren();
    return;
  }
  const images = visible.map((i) => {
    const image = document.createElement("img");
    const [sx, sy] = toScreen(i);
    image.src = `/api/images/${map.ids[i]}/thumbnail?size=${THUMBNAIL_PIXELS}`;
    image.alt = "";
    image.draggable = false;
    image.dataset.id = map.ids[i];
    image.style.left = `${sx - THUMBNAIL_PIXELS / 2}px`;
    image.style.top = `${sy - THUMBNAIL_PIXELS / 2}px`;
    return image;
  });
  layer.replaceChildren(...images);
}

// --- moving around --------------------------------------------------------------------------

function fitAll() {
  if (map.count === 0) return;
  let [minX, minY, maxX, maxY] = [Infinity, Infinity, -Infinity, -Infinity];
  for (let i = 0; i < map.count; i++) {
    minX = Math.min(minX, map.xy[2 * i]);
    maxX = Math.max(maxX, map.xy[2 * i]);
    minY = Math.min(minY, map.xy[2 * i + 1]);
    maxY = Math.max(maxY, map.xy[2 * i + 1]);
  }
  const canvas = $("map");
  view.x = (minX + maxX) / 2;
  view.y = (minY + maxY) / 2;
  const spanX = Math.max(maxX - minX, 1e-6);
  const spanY = Math.max(maxY - minY, 1e-6);
  view.scale = 0.9 * Math.min(canvas.clientWidth / spanX, canvas.clientHeight / spanY);
  requestDraw();
}

function zoomAt(px, py, factor) {
  const [mx, my] = toMap(px, py);
  view.scale *= factor;
  const [nx, ny] = toMap(px, py);
  view.x += mx - nx;
  view.y += my - ny;
  requestMovingDraw();
}

function panBy(dx, dy) {
  view.x -= dx / view.scale;
  view.y += dy / view.scale;
  requestMovingDraw();
}

// Pointer position in the frame's pixels, whatever element (canvas or photo) is under it.
function local(event) {
  const box = $("map-frame").getBoundingClientRect();
  return [event.clientX - box.left, event.clientY - box.top];
}

function listen() {
  const frame = $("map-frame");
  const pointers = new Map();
  let moved = 0;
  frame.addEventListener("pointerdown", (event) => {
    frame.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, local(event));
    moved = 0;
  });
  frame.addEventListener("pointermove", (event) => {
    const [px, py] = local(event);
    const last = pointers.get(event.pointerId);
    if (!last) return showHover(px, py);
    if (pointers.size === 2) return pinch(pointers, event);
    moved += Math.abs(px - last[0]) + Math.abs(py - last[1]);
    panBy(px - last[0], py - last[1]);
    pointers.set(event.pointerId, [px, py]);
  });
  const release = (event) => {
    const wasClick = pointers.size === 1 && moved < 4 && event.type === "pointerup";
    pointers.delete(event.pointerId);
    if (wasClick) openAt(...local(event));
  };
  frame.addEventListener("pointerup", release);
  frame.addEventListener("pointercancel", release);
  frame.addEventListener("wheel", (event) => {
    event.preventDefault();
    zoomAt(...local(event), Math.exp(-event.deltaY / 400));
  }, { passive: false });
  $("map").addEventListener("keydown", onKey);
  $("by-folder").addEventListener("change", colourByFolder);
  window.addEventListener("resize", requestDraw);
}

function pinch(pointers, event) {
  const [a, b] = [...pointers.values()];
  const before = Math.hypot(a[0] - b[0], a[1] - b[1]);
  pointers.set(event.pointerId, local(event));
  const [c, d] = [...pointers.values()];
  const after = Math.hypot(c[0] - d[0], c[1] - d[1]);
  if (before > 0) zoomAt((c[0] + d[0]) / 2, (c[1] + d[1]) / 2, after / before);
}

function onKey(event) {
  const canvas = $("map");
  const step = 60;
  const keys = {
    ArrowLeft: () => panBy(step, 0),
    ArrowRight: () => panBy(-step, 0),
    ArrowUp: () => panBy(0, step),
    ArrowDown: () => panBy(0, -step),
    "+": () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1.5),
    "=": () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1.5),
    "-": () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1 / 1.5),
    0: fitAll,
  };
  if (keys[event.key]) {
    event.preventDefault();
    keys[event.key]();
  }
}

async function showHover(px, py) {
  const hover = $("hover");
  const i = nearestPoint(px, py, 8);
  if (i < 0) {
    hover.hidden = true;
    return;
  }
  const id = map.ids[i];
  hover.dataset.id = id;
  hover.style.left = `${px + 12}px`;
  hover.style.top = `${py + 12}px`;
  const response = await fetch(`/api/images/${id}`);
  if (!response.ok || hover.dataset.id !== String(id)) return;
  const image = await response.json();
  hover.textContent = `${image.source} \u00b7 ${image.file_name}`;
  hover.hidden = false;
}

function openAt(px, py) {
  const i = nearestPoint(px, py, 8);
  if (i >= 0) window.location.href = `/?id=${map.ids[i]}`;
}

// --- start ----------------------------------------------------------------------------------

async function start() {
  try {
    const started = performance.now();
    await loadPoints();
    const id = Number.parseInt(new URLSearchParams(window.location.search).get("id") || "", 10);
    if (id > 0) await loadHighlight(id);
    shufflePoints();
    setUpGl();
    listen();
    fitAll();
    map.loadedMs = performance.now() - started;
    $("summary").textContent = `${map.count} images`;
  } catch (error) {
    $("message").textContent = `Map: ${error.message}`;
  }
}

window.lookalikeMap = { view, map, toScreen, zoomAt, panBy, isMoving: () => moving }; // for tests and benchmarks
start();
