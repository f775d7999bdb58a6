// fastnig neuron explorer: the page's own code (no library).  Views: overview (heat map of layer x
// component), neuron table (virtualised), neuron card, run facts; all driven by one `state`.
// Data: the JSON in #fastnig-data (fastnig/report/explorer.py documents its layout).
"use strict";
(function () {
  const timings = { start: performance.now() };
  const D = JSON.parse(document.getElementById("fastnig-data").textContent);
  const S = D.schemes.length, N = D.total, ROW = 22;
  timings.parsed = performance.now();

  function bytes(b64) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(b64);
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const values = new Float32Array(bytes(D.values).buffer);           // [S * N]
  const shares = D.shares ? bytes(D.shares) : new Uint8Array(0);     // [schemes with segments, N]: share codes
  const SHARE_STEPS = 20, SHARES = [];  // code -> [query, passage] share in 1/20 (explorer.py share_code)
  for (let q = 0; q <= SHARE_STEPS; q++) for (let p = 0; p <= SHARE_STEPS - q; p++) SHARES.push([q, p]);
  timings.decoded = performance.now();

  // neuron -> module, unit, layer, component (model order)
  const modOf = new Uint32Array(N), unitOf = new Uint32Array(N), layerOf = new Int32Array(N);
  const compOf = new Uint8Array(N);
  let offset = 0;
  D.modules.forEach(([, layer, comp, size], m) => {
    const c = D.components.indexOf(comp);
    for (let u = 0; u < size; u++, offset++) {
      modOf[offset] = m; unitOf[offset] = u; layerOf[offset] = layer; compOf[offset] = c;
    }
  });
  const layers = Array.from(new Set(layerOf)).sort((a, b) => a - b);
  const rowOf = new Uint16Array(N);  // neuron -> row of the heat map
  for (let i = 0; i < N; i++) rowOf[i] = layers.indexOf(layerOf[i]);
  const SEGMENTS = ["query", "passage", "special"];

  const v = (s, i) => values[s * N + i];
  const orders = {};  // "s:by" -> Uint32Array of neurons, most important first (ties: model order)
  function order(s, by) {
    // A float32 value widened to float64 has 29 zero mantissa bits: the neuron's index goes there, so a
    // plain numeric sort of -value (no comparator) orders by value descending, ties by index ascending.
    const key = s + ":" + by;
    if (!orders[key]) {
      const base = s * N, keys = new Float64Array(N), words = new Uint32Array(keys.buffer), MAX = 0x1fffffff;
      for (let i = 0; i < N; i++) {
        const x = by === "abs" ? -Math.abs(values[base + i]) : -values[base + i];
        keys[i] = x === 0 ? 0 : x;  // -0 -> +0
        words[2 * i] |= keys[i] < 0 ? MAX - i : i;  // little-endian: the low word first
      }
      keys.sort();
      const idx = new Uint32Array(N);
      for (let r = 0; r < N; r++) {
        const code = words[2 * r] & MAX;
        idx[r] = keys[r] < 0 ? MAX - code : code;
      }
      orders[key] = idx;
    }
    return orders[key];
  }
  const tops = {};  // "s:level" -> Uint8Array membership of the top-X % set (by value)
  function top(s, level) {
    const key = s + ":" + level;
    if (!tops[key]) {
      const k = D.topCounts[level], o = order(s, "value"), m = new Uint8Array(N);
      for (let r = 0; r < k; r++) m[o[r]] = 1;
      tops[key] = m;
    }
    return tops[key];
  }
  function setMask(setIndex, level) {
    const terms = D.sets[setIndex].terms.map((s) => top(s, level));
    if (terms.length === 1) return terms[0];
    const m = new Uint8Array(N);
    for (let i = 0; i < N; i++) m[i] = terms.every((t) => t[i]) ? 1 : 0;
    return m;
  }
  function rankOf(s, i, by) {  // 1-based rank of neuron i in scheme s (as Scheme.ranking)
    const base = s * N, f = by === "abs" ? Math.abs : (x) => x, vi = f(values[base + i]);
    let r = 1;
    for (let j = 0; j < N; j++) {
      const vj = f(values[base + j]);
      if (vj > vi || (vj === vi && j < i)) r++;
    }
    return r;
  }
  function segmentShares(s, i) {  // [query, passage, special] shares in [0, 1], or null
    const k = D.schemes[s].shares;
    if (k < 0) return null;
    const [q, p] = SHARES[shares[k * N + i]];
    return [q / SHARE_STEPS, p / SHARE_STEPS, (SHARE_STEPS - q - p) / SHARE_STEPS];
  }
  function dominant(s, i) {
    const sh = segmentShares(s, i);
    if (!sh) return -1;
    return sh[0] >= sh[1] && sh[0] >= sh[2] ? 0 : sh[1] >= sh[2] ? 1 : 2;
  }
  const neuronName = (i) => `${D.modules[modOf[i]][0]}:${unitOf[i]}`;
  const shortName = (i) => `L${layerOf[i]} ${D.components[compOf[i]]} ${unitOf[i]}`;
  const fmt = (x) => (x === 0 ? "0" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toPrecision(4) : x.toExponential(3));

  // ---------------------------------------------------------------- state
  const defaultLevel = String(D.defaultLevel in D.topCounts ? D.defaultLevel : D.levels[0]);
  const state = {
    view: "overview", scheme: 0, level: defaultLevel, metric: "count", set: -1, cell: null, selected: -1,
    filter: { layer: "", comp: "", inSet: "", outSet: "", segment: "" }, sort: { scheme: 0, by: "value", desc: true },
  };
  let rows = new Uint32Array(0);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, val] of Object.entries(attrs || {})) {
      if (k === "class") e.className = val; else if (k === "text") e.textContent = val;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), val); else e.setAttribute(k, val);
    }
    for (const c of children) e.append(c);
    return e;
  }
  function options(select, items, value) {
    select.replaceChildren(...items.map(([val, label]) => el("option", { value: val, text: label })));
    select.value = value;
  }
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- tabs
  const VIEWS = [["overview", "Overview"], ["table", "Neurons"], ["card", "Neuron card"], ["facts", "Run facts"]];
  function show(view) {
    state.view = view;
    for (const [id] of VIEWS) {
      $(id).classList.toggle("active", id === view);
      $("tab-" + id).classList.toggle("active", id === view);
    }
    if (view === "table") renderRows();
  }
  $("tabs").append(...VIEWS.map(([id, label]) => el("button", { id: "tab-" + id, text: label, onclick: () => show(id) })));

  // ---------------------------------------------------------------- overview
  function drawHeatmap() {
    const s = state.scheme, mask = state.set >= 0 ? setMask(state.set, state.level) : top(s, state.level);
    const comps = D.components, L = layers.length, C = comps.length;
    const count = new Float64Array(L * C), mass = new Float64Array(L * C);
    let total = 0;
    for (let i = 0; i < N; i++) {
      const cell = rowOf[i] * C + compOf[i], a = Math.abs(v(s, i));
      mass[cell] += a; total += a;
      if (mask[i]) count[cell]++;
    }
    const metric = state.metric === "share" ? Array.from(mass, (x) => (total ? x / total : 0)) : Array.from(count);
    const peak = Math.max(...metric, 1e-300);
    const mine = state.selected >= 0 ? [layerOf[state.selected], compOf[state.selected]] : null;
    const table = el("table", { id: "heat" }, el("tr", {}, el("th", { text: "layer" }),
      ...comps.map((c) => el("th", { text: c }))));
    layers.forEach((layer, li) => {
      const tr = el("tr", {}, el("th", { text: layer < 0 ? "other" : String(layer) }));
      comps.forEach((comp, ci) => {
        const x = metric[li * C + ci], a = x / peak;
        const td = el("td", {
          class: "cell", "data-layer": layer, "data-comp": comp,
          text: state.metric === "share" ? (100 * x).toFixed(1) + " %" : String(count[li * C + ci]),
          title: `layer ${layer}, ${comp}: ${count[li * C + ci]} neurons in the set, ${(100 * mass[li * C + ci] / (total || 1)).toFixed(2)} % of the |NIG| of ${D.schemes[s].name}`,
          onclick: () => selectCell(layer, comp),
        });
        td.style.background = `rgba(40, 90, 200, ${0.08 + 0.85 * a})`;
        td.style.color = a > 0.55 ? "#fff" : "#222";
        if (state.cell && state.cell[0] === layer && state.cell[1] === comp) td.classList.add("selected");
        if (mine && mine[0] === layer && mine[1] === ci) td.classList.add("mine");
        tr.append(td);
      });
      table.append(tr);
    });
    $("heatmap").replaceChildren(table);
    const what = state.set >= 0 ? D.sets[state.set].name : D.schemes[s].name;
    $("heatnote").textContent = `${what} at top ${state.level} % (${D.topCounts[state.level]} of ${N} neurons per scheme); ` +
      "click a cell to list its neurons, a set to filter the table by it.";
  }
  function selectCell(layer, comp) {
    state.cell = [layer, comp];
    state.filter.layer = String(layer); state.filter.comp = comp;
    $("f-layer").value = state.filter.layer; $("f-component").value = comp;
    drawHeatmap(); refilter(); show("table");
  }
  function buildOverview() {
    options($("scheme"), D.schemes.map((s, i) => [i, s.name]), 0);
    options($("level"), D.levels.map((l) => [String(l), String(l)]), state.level);
    $("scheme").onchange = (e) => { state.scheme = +e.target.value; drawHeatmap(); };
    $("level").onchange = (e) => { state.level = e.target.value; drawHeatmap(); refilter(); if (state.selected >= 0) drawCard(); };
    $("metric").onchange = (e) => { state.metric = e.target.value; drawHeatmap(); };
    $("sets").append(el("span", { text: "named sets:" }), ...D.sets.map((set, k) => el("button", {
      text: set.name, "data-set": k, onclick: () => toggleSet(k),
    })));
  }
  function toggleSet(k) {
    state.set = state.set === k ? -1 : k;
    for (const b of $("sets").querySelectorAll("button")) b.classList.toggle("on", +b.dataset.set === state.set);
    state.filter.inSet = state.set >= 0 ? String(state.set) : "";
    $("f-in").value = state.filter.inSet;
    drawHeatmap(); refilter();
  }

  // ---------------------------------------------------------------- neuron table
  const COLUMNS = [["neuron", "neuron"], ["layer", "layer"], ["component", "component"], ["segment", "dominant"],
    ["rank", "rank"]].concat(D.schemes.map((s, k) => ["s" + k, s.name]));
  const template = "minmax(220px, 2fr) 50px 120px 80px 70px " + "minmax(80px, 1fr) ".repeat(S);
  function buildTable() {
    const setItems = [["", "(any)"]].concat(D.sets.map((s, k) => [String(k), s.name]));
    options($("f-layer"), [["", "(all)"]].concat(layers.map((l) => [String(l), l < 0 ? "other" : String(l)])), "");
    options($("f-component"), [["", "(all)"]].concat(D.components.map((c) => [c, c])), "");
    options($("f-in"), setItems, "");
    options($("f-out"), [["", "(none)"]].concat(setItems.slice(1)), "");
    options($("f-segment"), [["", "(any)"]].concat(SEGMENTS.map((s, k) => [String(k), s])), "");
    const sorts = [["model", "model order"]];
    D.schemes.forEach((s, k) => sorts.push([`${k}:value:1`, `${s.name} value (rank) ↓`], [`${k}:abs:1`, `${s.name} |value| ↓`],
      [`${k}:value:0`, `${s.name} value ↑`]));
    options($("sort"), sorts, "0:value:1");
    for (const [id, key] of [["f-layer", "layer"], ["f-component", "comp"], ["f-in", "inSet"], ["f-out", "outSet"], ["f-segment", "segment"]]) {
      $(id).onchange = (e) => { state.filter[key] = e.target.value; if (key === "layer" || key === "comp") state.cell = null; refilter(); };
    }
    $("sort").onchange = (e) => {
      const [s, by, desc] = e.target.value.split(":");
      state.sort = s === "model" ? { scheme: state.sort.scheme, by: "model", desc: true } : { scheme: +s, by, desc: desc === "1" };
      refilter();
    };
    const head = $("grid-head");
    head.style.gridTemplateColumns = template;
    head.append(...COLUMNS.map(([key, label], c) => el("div", {
      text: label, class: c >= 4 ? "num" : "", title: c >= 5 ? `sort by ${label} (click again: ascending)` : label,
      onclick: () => { if (c >= 5) sortBy(c - 5); },
    })));
    $("grid").addEventListener("scroll", renderRows);
  }
  function sortBy(k) {
    const same = state.sort.scheme === k && state.sort.by === "value";
    state.sort = { scheme: k, by: "value", desc: same ? !state.sort.desc : true };
    $("sort").value = `${k}:value:${state.sort.desc ? 1 : 0}`;
    refilter();
  }
  function refilter() {
    const f = state.filter, s = state.sort.scheme;
    const inMask = f.inSet !== "" ? setMask(+f.inSet, state.level) : null;
    const outMask = f.outSet !== "" ? setMask(+f.outSet, state.level) : null;
    const layer = f.layer !== "" ? +f.layer : null, comp = f.comp !== "" ? D.components.indexOf(f.comp) : null;
    const seg = f.segment !== "" ? +f.segment : null;
    const base = state.sort.by === "model" ? null : order(s, state.sort.by);
    const out = new Uint32Array(N);
    let n = 0;
    for (let r = 0; r < N; r++) {
      const i = base ? base[state.sort.desc ? r : N - 1 - r] : r;
      if (layer !== null && layerOf[i] !== layer) continue;
      if (comp !== null && compOf[i] !== comp) continue;
      if (inMask && !inMask[i]) continue;
      if (outMask && outMask[i]) continue;
      if (seg !== null && dominant(s, i) !== seg) continue;
      out[n++] = i;
    }
    rows = out.subarray(0, n);
    $("rowcount").textContent = `${n} of ${N} neurons`;
    $("grid-spacer").style.height = n * ROW + "px";
    $("grid").scrollTop = 0;
    renderRows();
  }
  let rankCache = { key: "", rank: null };
  function sortRank(i) {  // rank by value in the sort scheme, from its order (1-based)
    const s = state.sort.scheme, key = s + "";
    if (rankCache.key !== key) {
      const o = order(s, "value"), rank = new Uint32Array(N);
      for (let r = 0; r < N; r++) rank[o[r]] = r + 1;
      rankCache = { key, rank };
    }
    return rankCache.rank[i];
  }
  function renderRows() {
    if (state.view !== "table" && document.body.dataset.ready) return;
    const grid = $("grid"), first = Math.max(0, Math.floor(grid.scrollTop / ROW) - 5);
    const last = Math.min(rows.length, first + Math.ceil((grid.clientHeight || 600) / ROW) + 10);
    const box = $("grid-rows"), s = state.sort.scheme, children = [];
    box.style.transform = `translateY(${first * ROW}px)`;
    for (let r = first; r < last; r++) {
      const i = rows[r], d = dominant(s, i);
      const cells = [el("div", { text: neuronName(i), title: neuronName(i) }), el("div", { class: "num", text: String(layerOf[i]) }),
        el("div", { text: D.components[compOf[i]] }), el("div", { text: d < 0 ? "" : SEGMENTS[d] }),
        el("div", { class: "num", text: String(sortRank(i)) })];
      for (let k = 0; k < S; k++) cells.push(el("div", { class: "num", text: fmt(v(k, i)) }));
      const row = el("div", { class: "row" + (i === state.selected ? " selected" : ""), "data-neuron": i,
        onclick: () => select(i) }, ...cells);
      row.style.gridTemplateColumns = template;
      children.push(row);
    }
    box.replaceChildren(...children);
  }

  // ---------------------------------------------------------------- neuron card
  function select(i) {
    state.selected = i;
    drawCard(); drawHeatmap(); renderRows(); show("card");
  }
  function bar(share, color) {
    const b = el("span", { class: "bar" });
    b.style.width = Math.round(share * 60) + "px"; b.style.background = color;
    return b;
  }
  function tokenSpans(pair, tokens, scale) {
    const q = new Int8Array(bytes(tokens).buffer), spans = [];
    pair.tokens.forEach((t, k) => {
      const x = (q[k] || 0) * scale, a = Math.abs(q[k] || 0) / 127;
      const span = el("span", { class: "tok" + (pair.segments[k] === 2 ? " special" : ""), text: t.replace(/^##/, ""),
        title: `${t}: ${fmt(x)}` });
      span.style.background = x >= 0 ? `rgba(220, 60, 30, ${a})` : `rgba(30, 90, 220, ${a})`;
      if (a > 0.6) span.style.color = "#fff";
      if (k > 0 && !t.startsWith("##")) spans.push(" ");  // a break opportunity between words
      spans.push(span);
    });
    return spans;
  }
  function drawCard() {
    const i = state.selected, card = $("card");
    if (i < 0) return;
    const rowsCard = D.schemes.map((s, k) => {
      const sh = segmentShares(k, i), inTop = top(k, state.level)[i];
      return el("tr", {}, el("td", { text: s.name }), el("td", { class: "num", text: fmt(v(k, i)), "data-value": v(k, i) }),
        el("td", { class: "num", text: String(rankOf(k, i, "value")) }), el("td", { class: "num", text: String(rankOf(k, i, "abs")) }),
        el("td", { text: inTop ? "yes" : "" }),
        el("td", {}, ...(sh ? [bar(sh[0], "#c63"), bar(sh[1], "#36c"), bar(sh[2], "#999"),
          el("span", { text: " " + sh.map((x) => Math.round(100 * x) + " %").join(" / ") })] : [])));
    });
    const head = el("tr", {}, ...["scheme", "mean NIG", "rank", "rank |·|", `top ${state.level} %`, "query / passage / special"]
      .map((t) => el("th", { text: t })));
    const member = D.sets.filter((set, k) => setMask(k, state.level)[i]).map((set) => set.name);
    const parts = [el("h2", { text: neuronName(i) }),
      el("p", { text: `layer ${layerOf[i]}, ${D.components[compOf[i]]}, unit ${unitOf[i]}; ranks among ${N} neurons (1 = largest).` }),
      el("table", { id: "card-values" }, head, ...rowsCard),
      el("p", { id: "card-sets", text: `Sets at top ${state.level} %: ` + (member.length ? member.join(", ") : "none") })];
    const ex = D.exemplars[String(i)];
    parts.push(el("h3", { text: "Exemplar pairs (largest |NIG| of this neuron in each scheme)" }));
    if (!ex || !ex.length) {
      parts.push(el("p", { class: "note", text: "No exemplars of this neuron in this file. " + (D.hint || "").replace("{neuron}", neuronName(i)) }));
    } else {
      for (const e of ex) {
        const pair = D.pairs[e.pair];
        parts.push(el("div", { class: "pair" },
          el("div", { class: "meta", text: `${D.schemes[e.scheme].name} · NIG ${fmt(e.value)} · pair ${pair.id.replace("\t", " / ")}` }),
          el("div", { class: "tokens" }, ...tokenSpans(pair, e.tokens, e.scale)),
          el("details", {}, el("summary", { text: "text" }), el("p", { class: "query", text: "Query: " + pair.query }),
            el("p", { class: "passage", text: "Passage: " + pair.passage }))));
      }
    }
    card.replaceChildren(...parts);
  }

  // ---------------------------------------------------------------- run facts
  function buildFacts() {
    const box = $("facts");
    if (!D.facts.length) box.append(el("p", { class: "note", text: "No run facts in this file." }));
    for (const f of D.facts) {
      const div = el("div", { class: "fact" });
      div.innerHTML = f.html;  // rendered by fastnig (markdown-it, raw HTML escaped)
      box.append(el("h2", { text: f.title }), div);
    }
  }

  // ---------------------------------------------------------------- start
  document.title = D.title + " — fastnig neuron explorer";
  $("title").textContent = D.title + " — neuron explorer (" + D.model + ")";
  buildOverview(); buildTable(); buildFacts();
  show("overview");
  drawHeatmap();
  timings.heatmap = performance.now();
  state.view = "table"; refilter(); state.view = "overview";
  timings.table = performance.now();
  window.explorerTimings = timings;
  window.explorer = { state, rows: () => Array.from(rows), select, selectCell, toggleSet, sortBy, refilter, show, neuronName,
    withExemplars: () => Object.keys(D.exemplars).map(Number), N, S };
  window.explorerReadyMs = performance.now();
  document.body.dataset.ready = "1";
})();
