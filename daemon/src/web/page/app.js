// The live plate page: one EventSource on /api/events (the whole state first, then changes),
// a heatmap of the plate coloured by the chosen metric, and the selected well's fields,
// readout history and follow-up requests. No library, no network beyond this daemon.
"use strict";

const state = { plate: null, rows: 8, columns: 12, planned: [], channels: [], wells: {}, header: {}, zarr: null };
let selected = null;
let metric = "cells";

const $ = (id) => document.getElementById(id);
const rowName = (r) => String.fromCharCode(65 + r);

function metricValue(well, m) {
  if (!well) return undefined;
  if (m === "cells") return well.cells;
  if (m === "deadline misses") return well.deadline_misses;
  if (m === "degraded") return well.degraded;
  if (m.startsWith("mean: ")) return well.means[m.slice(6)];
  if (m.startsWith("relocalization: ")) return well.localization?.[m.slice(16)]?.shift;
  if (m.startsWith("bulk: ")) {
    const [model, gene] = m.slice(6).split(" / ");
    const b = well.bulk[model];
    if (!b) return undefined;
    const k = b.outputs.indexOf(gene);
    return k >= 0 ? b.values[k] : undefined;
  }
  return undefined;
}

function metricNames() {
  const names = new Set(["cells", "deadline misses", "degraded"]);
  for (const w of Object.values(state.wells)) {
    for (const k of Object.keys(w.means || {})) names.add("mean: " + k);
    for (const [model, b] of Object.entries(w.bulk || {})) for (const g of b.outputs) names.add(`bulk: ${model} / ${g}`);
    for (const p of Object.keys(w.localization || {})) names.add("relocalization: " + p);
  }
  return [...names];
}

function colour(t) {
  // A perceptual ramp from dark blue through green to yellow (viridis' end points).
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function renderHeader() {
  const h = state.header || {};
  $("plate").textContent = state.plate || "";
  $("h-state").textContent = h.state || "";
  $("h-fields").textContent = h.fields_done ?? 0;
  $("h-rate").textContent = h.fields_per_s ? h.fields_per_s.toFixed(2) : "–";
  $("h-latency").textContent = h.fields_done ? `${Math.round(h.latency_p50_ms)} / ${Math.round(h.latency_p99_ms)} ms` : "–";
  $("h-misses").textContent = h.deadline_misses ?? 0;
  $("h-backlog").textContent = h.backlog ?? 0;
  // Fields written raw while the workers were busy, still to be analysed, and when they will be.
  $("h-lagging").textContent = (h.lagging ?? 0) + (h.eta_s != null ? `, done in ~${Math.round(h.eta_s)} s` : "");
  $("h-lag").textContent = h.worst_lag_ms ? `${(h.worst_lag_ms / 1000).toFixed(1)} s` : "–";
  if (state.zarr) {
    const a = $("viewer");
    a.hidden = false;
    a.href = "https://hms-dbmi.github.io/vizarr/?source=" + encodeURIComponent(location.origin + state.zarr);
  }
}

function renderMetricChoice() {
  const sel = $("metric");
  const names = metricNames();
  if (sel.options.length === names.length) return;
  sel.innerHTML = "";
  for (const n of names) sel.add(new Option(n, n, false, n === metric));
}

function renderGrid() {
  const grid = $("grid");
  grid.style.gridTemplateColumns = `repeat(${state.columns + 1}, 28px)`;
  const values = Object.values(state.wells).map((w) => metricValue(w, metric)).filter((v) => Number.isFinite(v));
  const lo = Math.min(...values), hi = Math.max(...values);
  const cells = [document.createElement("div")];
  cells[0].className = "label";
  for (let c = 0; c < state.columns; c++) {
    const d = document.createElement("div");
    d.className = "label";
    d.textContent = c + 1;
    cells.push(d);
  }
  for (let r = 0; r < state.rows; r++) {
    const l = document.createElement("div");
    l.className = "label";
    l.textContent = rowName(r);
    cells.push(l);
    for (let c = 0; c < state.columns; c++) {
      const name = rowName(r) + (c + 1);
      const w = state.wells[name];
      const d = document.createElement("div");
      d.className = "well";
      d.dataset.well = name;
      if (state.planned.includes(name)) d.classList.add("planned");
      const v = metricValue(w, metric);
      if (w && w.fields.length) {
        d.classList.add("has-data");
        d.title = `${name}: ${metric} ${Number.isFinite(v) ? v.toPrecision(4) : "n/a"}`;
        if (Number.isFinite(v)) d.style.background = colour(hi > lo ? (v - lo) / (hi - lo) : 0.5);
        d.onclick = () => select(name);
      }
      if (name === selected) d.classList.add("selected");
      cells.push(d);
    }
  }
  grid.replaceChildren(...cells);
  $("legend").textContent = values.length ? `${metric}: ${lo.toPrecision(4)} … ${hi.toPrecision(4)} over ${values.length} wells` : "no wells yet";
}

function renderWell() {
  if (!selected) return;
  const w = state.wells[selected];
  if (!w) return;
  $("well-panel").hidden = false;
  $("well-name").textContent = selected;
  $("well-summary").textContent = `${new Set(w.fields.map((f) => f[0])).size} fields, ${w.cells} cells, ` +
    `${w.deadline_misses} deadline misses, ${w.degraded} degraded` +
    (w.lagging ? `; ${w.lagging} more acquired, analysis owed` : "");
  const fields = $("fields");
  // Each field at its latest timepoint written.
  const latest = new Map();
  for (const [f, t] of w.fields) latest.set(f, Math.max(t, latest.get(f) ?? 0));
  const shown = [...latest.keys()].sort((a, b) => a - b);
  const row = selected[0], col = selected.slice(1);
  const rows = shown.map((f) => {
    const div = document.createElement("div");
    div.className = "field-row";
    state.channels.forEach((ch, k) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = `${selected} field ${f} ${ch}`;
      img.src = `/api/thumb/${row}/${col}/${f}/${k}.png?t=${latest.get(f)}`;
      const cap = document.createElement("figcaption");
      cap.textContent = `f${f} t${latest.get(f)} ${ch}`;
      fig.append(img, cap);
      div.append(fig);
    });
    return div;
  });
  fields.replaceChildren(...rows);
  const readout = $("readout");
  const models = Object.entries(w.bulk || {});
  if (!models.length) {
    readout.textContent = "no well-level readout";
  } else {
    const [model, b] = models[0];
    const genes = b.outputs.slice(0, 6);
    const t = document.createElement("table");
    t.id = "readout-table";
    const cell = (tag, text) => Object.assign(document.createElement(tag), { textContent: text });
    t.append(cell("caption", `${model}: ln abundance after each field`));
    const head = document.createElement("tr");
    head.append(cell("th", "fields"), ...genes.map((g) => cell("th", g)));
    t.append(head);
    b.history.forEach((h, i) => {
      const tr = document.createElement("tr");
      tr.append(cell("td", String(i + 1)), ...genes.map((_, k) => cell("td", h.length ? h[k].toFixed(3) : "")));
      t.append(tr);
    });
    readout.replaceChildren(t);
  }
  const loc = Object.entries(w.localization || {});
  const shifts = $("localization");
  if (!loc.length) {
    shifts.textContent = "no relocalization score (needs the localize stage and control wells)";
  } else {
    const t = document.createElement("table");
    t.id = "localization-table";
    const cell = (tag, text) => Object.assign(document.createElement(tag), { textContent: text });
    t.append(cell("caption", "relocalization against the control wells"));
    const head = document.createElement("tr");
    head.append(...["protein", "shift (z)", "p", "fields", "nucleus", "cytoplasm", "membrane", "er", "puncta"].map((h) => cell("th", h)));
    t.append(head);
    for (const [p, s] of loc) {
      const tr = document.createElement("tr");
      if (s.relocalized) tr.className = "relocalized";
      const frac = s.features.slice(0, 5).map((_, k) => `${s.profile[k].toFixed(2)} (${s.control[k].toFixed(2)})`);
      tr.append(cell("td", p), cell("td", s.shift.toFixed(1)), cell("td", s.p.toFixed(3)), cell("td", String(s.fields)), ...frac.map((f) => cell("td", f)));
      t.append(tr);
    }
    shifts.replaceChildren(t);
  }
  const ul = $("followups");
  ul.replaceChildren(...(w.followups.length ? w.followups.map((f) => {
    const li = document.createElement("li");
    li.textContent = `${f.rule} (${f.id}): ${f.state}`;
    return li;
  }) : [Object.assign(document.createElement("li"), { textContent: "none" })]));
}

function select(name) {
  selected = name;
  renderGrid();
  renderWell();
}

function render() {
  renderHeader();
  renderMetricChoice();
  renderGrid();
  renderWell();
}

$("metric").onchange = (e) => { metric = e.target.value; renderGrid(); };

const source = new EventSource("/api/events");
source.onmessage = (e) => {
  const ev = JSON.parse(e.data);
  if (ev.type === "snapshot") {
    Object.assign(state, ev);
  } else if (ev.type === "well") {
    state.wells[ev.well] = ev.data;
  } else if (ev.type === "header") {
    state.header = ev.data;
  }
  render();
};
source.onerror = () => { $("h-state").textContent = state.header.state === "finished" ? "finished" : "disconnected"; };
