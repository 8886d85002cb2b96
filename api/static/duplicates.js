// lookalike duplicates page: groups of near-identical images, a threshold slider, a histogram.
"use strict";

const PAGE = 20;
const $ = (id) => document.getElementById(id);
let shown = 0;
let request = null;

async function fetchPage(threshold, offset) {
  if (request) request.abort();
  request = new AbortController();
  const query = new URLSearchParams({ offset, limit: PAGE });
  if (threshold !== null) query.set("threshold", threshold);
  const response = await fetch(`/api/duplicates?${query}`, { signal: request.signal });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body && body.detail ? body.detail : response.statusText);
  return body;
}

function describe(image, representative) {
  const parts = [image.file_name, `source ${image.source}`];
  if (image.width && image.height) parts.push(`${image.width}\u00d7${image.height}`);
  parts.push(`${Math.round(image.size / 1024)} KB`);
  if (representative) parts.push("representative");
  else if (image.kind === "exact") parts.push("exact copy");
  else parts.push(`near \u00b7 distance ${image.distance.toFixed(3)}`);
  return parts.join(" \u00b7 ");
}

function renderGroup(group) {
  const item = document.createElement("li");
  item.className = "group";
  const title = document.createElement("h3");
  title.textContent = `${group.size} images`;
  item.append(title);
  const row = document.createElement("ul");
  row.setAttribute("role", "list");
  for (const [index, image] of group.images.entries()) {
    const cell = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/?id=${image.id}`;
    const thumbnail = document.createElement("img");
    thumbnail.src = `/api/images/${image.id}/thumbnail?size=128`;
    thumbnail.alt = "";
    thumbnail.loading = "lazy";
    const caption = document.createElement("span");
    caption.textContent = describe(image, index === 0);
    link.append(thumbnail, caption);
    cell.append(link);
    row.append(cell);
  }
  item.append(row);
  return item;
}

function drawHistogram(histogram, distance) {
  const svg = $("histogram");
  const { edges, counts } = histogram;
  const top = edges[edges.length - 1] || 1;
  const highest = Math.max(1, ...counts);
  const width = 600 / counts.length;
  const bars = counts.map((count, i) => {
    const height = (count / highest) * 110;
    return `<rect x="${i * width}" y="${120 - height}" width="${width - 1}" height="${height}"></rect>`;
  });
  const x = Math.min(600, (distance / top) * 600);
  svg.innerHTML = `${bars.join("")}<line class="threshold-line" x1="${x}" x2="${x}" y1="0" y2="120"></line>`;
}

async function show(threshold, append) {
  const offset = append ? shown : 0;
  try {
    const page = await fetchPage(threshold, offset);
    if (!append) {
      $("groups").replaceChildren();
      shown = 0;
      $("threshold").value = page.threshold;
      $("threshold-value").textContent = page.threshold.toFixed(2);
      drawHistogram(page.histogram, page.distance);
    }
    for (const group of page.groups) $("groups").append(renderGroup(group));
    shown += page.groups.length;
    $("summary").textContent =
      `${page.total_groups} groups, ${page.images_in_groups} images at threshold ${page.threshold.toFixed(2)}`;
    $("message").textContent = page.total_groups ? "" : "No duplicates at this threshold.";
    $("more").hidden = shown >= page.total_groups;
  } catch (error) {
    if (error.name !== "AbortError") $("message").textContent = error.message;
  }
}

$("threshold").addEventListener("input", () => {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
});
$("threshold").addEventListener("change", () => show(Number($("threshold").value), false));
$("threshold-form").addEventListener("submit", (event) => event.preventDefault());
$("more").addEventListener("click", () => show(Number($("threshold").value), true));
show(null, false);
