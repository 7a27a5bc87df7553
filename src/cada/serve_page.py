"""The web page `cada serve` answers at /: drop images, see each decision and its heatmap overlay.

One self-contained HTML file (no external scripts, styles or fonts): it reads GET /info for the threshold and
sends the dropped images to POST /predict?overlay=1 as multipart/form-data.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cada serve</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  #info { color: #555; font-size: .9rem; margin-bottom: 1rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; background: #fff;
          cursor: pointer; }
  #drop.over { border-color: #06c; background: #eef5ff; }
  #status { margin: .8rem 0; min-height: 1.2em; }
  .error { color: #b00; }
  #results { display: flex; flex-wrap: wrap; gap: 1rem; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: .6rem; width: 320px; }
  .card img { width: 100%; border-radius: 4px; display: block; }
  .badge { display: inline-block; padding: .1rem .5rem; border-radius: 4px; color: #fff; font-weight: 600; }
  .anomalous { background: #c62828; } .normal { background: #2e7d32; } .unknown { background: #777; }
  .unfamiliar { background: #ef6c00; margin-left: .3rem; }
  .name { font-weight: 600; overflow-wrap: anywhere; margin-bottom: .3rem; }
  table { font-size: .85rem; margin-top: .4rem; border-collapse: collapse; }
  td { padding: .05rem .6rem .05rem 0; }
</style>
</head>
<body>
<h1>cada: anomaly detection</h1>
<div id="info">loading the model's settings...</div>
<div id="drop" tabindex="0">Drop images here, or click to choose files
  <input id="files" type="file" accept="image/*" multiple hidden>
</div>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const drop = document.getElementById("drop"), files = document.getElementById("files");
const statusLine = document.getElementById("status"), results = document.getElementById("results");
const number = (value) => (value === null || value === undefined) ? "-" : Number(value).toFixed(4);

fetch("info").then((r) => r.json()).then((info) => {
  const line = info.threshold === null ? "no threshold (scores only)"
    : "threshold " + number(info.threshold) + " (" + info.threshold_source + ")";
  document.getElementById("info").textContent = "model " + info.model + ", cada " + info.cada_version + "; " + line;
}).catch(() => { document.getElementById("info").textContent = "could not read /info"; });

function cell(row, label, value) {
  const tr = row.insertRow();
  tr.insertCell().textContent = label;
  tr.insertCell().textContent = value;
}

function card(prediction) {
  const div = document.createElement("div");
  div.className = "card";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = prediction.name;
  div.appendChild(name);
  const badge = document.createElement("span");
  const decided = prediction.anomalous === null ? "unknown" : (prediction.anomalous ? "anomalous" : "normal");
  badge.className = "badge " + decided;
  badge.textContent = decided === "unknown" ? "no threshold" : decided;
  div.appendChild(badge);
  if (prediction.unfamiliar) {
    const flag = document.createElement("span");
    flag.className = "badge unfamiliar";
    flag.textContent = "unfamiliar product";
    flag.title = "unlike every training image: its score means little";
    div.appendChild(flag);
  }
  if (prediction.overlay_png) {
    const img = document.createElement("img");
    img.alt = "heatmap overlay of " + prediction.name;
    img.src = "data:image/png;base64," + prediction.overlay_png;
    img.style.marginTop = ".4rem";
    div.appendChild(img);
  }
  const table = document.createElement("table");
  cell(table, "score", number(prediction.score));
  cell(table, "threshold", number(prediction.threshold));
  if ("u" in prediction) { cell(table, "u", number(prediction.u)); cell(table, "spread", number(prediction.spread)); }
  if ("nearest_distance" in prediction) cell(table, "nearest distance", number(prediction.nearest_distance));
  cell(table, "size", prediction.width + " x " + prediction.height);
  div.appendChild(table);
  return div;
}

async function send(list) {
  if (!list.length) return;
  const form = new FormData();
  for (const file of list) form.append("image", file, file.name);
  statusLine.className = "";
  statusLine.textContent = "scoring " + list.length + " image(s)...";
  try {
    const response = await fetch("predict?overlay=1", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    for (const prediction of answer.predictions.slice().reverse()) results.prepend(card(prediction));
    statusLine.textContent = "scored " + answer.predictions.length + " image(s)";
  } catch (error) {
    statusLine.className = "error";
    statusLine.textContent = "error: " + error.message;
  }
}

drop.addEventListener("click", () => files.click());
drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") files.click(); });
files.addEventListener("change", () => { send(Array.from(files.files)); files.value = ""; });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  send(Array.from(event.dataTransfer.files));
});
</script>
</body>
</html>
"""
