"""The report's page, style and script, inlined into index.html (no network, no package data)."""

CSS = r"""
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #d9dce1; --accent: #3f51b5; --hit: #1b7f3b; --miss: #b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin: 1.2rem 0 .2rem; }
h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
.meta { color: var(--muted); margin: 0 0 .6rem; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid var(--line); padding: .3rem .55rem; text-align: left; vertical-align: middle; }
th { background: #f3f4f7; position: sticky; top: 0; z-index: 1; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable::after { content: " \21C5"; color: var(--muted); font-size: .8em; }
th.sorted-asc::after { content: " \25B2"; color: var(--accent); }
th.sorted-desc::after { content: " \25BC"; color: var(--accent); }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
img.thumb { height: 96px; width: auto; display: block; image-rendering: auto; }
img.big { height: 200px; width: auto; display: block; }
.hit { color: var(--hit); font-weight: 600; }
.miss { color: var(--miss); font-weight: 600; }
.na { color: var(--muted); }
.controls { display: flex; flex-wrap: wrap; gap: 1rem 2rem; align-items: flex-start; background: #f8f9fb;
            border: 1px solid var(--line); border-radius: 6px; padding: .7rem 1rem; margin-bottom: .8rem; }
.controls fieldset { border: 0; margin: 0; padding: 0; }
.controls legend { font-weight: 600; padding: 0; margin-bottom: .2rem; }
.controls label { margin-right: .7rem; white-space: nowrap; }
#count { color: var(--muted); margin: .3rem 0; }
.pair { display: flex; gap: .8rem; align-items: flex-start; }
.pair figure { margin: 0; }
.pair figcaption { font-size: .85rem; color: var(--muted); }
.note { color: var(--muted); font-size: .9rem; max-width: 70rem; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var state = { key: "image", dir: 1 };

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; } else if (k === "cls") { e.className = attrs[k]; }
      else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(c); } });
    return e;
  }
  function fmt(v, digits) { return (v === null || v === undefined) ? "\u2013" : Number(v).toFixed(digits); }
  function hitCell(v) {
    if (v === null || v === undefined) { return el("td", { cls: "na", text: "\u2013" }); }
    return el("td", { cls: v ? "hit" : "miss", text: v ? "hit" : "miss" });
  }
  function image(i) { return data.images[i]; }

  // ---------------------------------------------------------------- summary
  function buildSummary() {
    var t = document.getElementById("summary");
    var head = ["method", "layer", "maps"];
    if (data.has_scores) { head = head.concat(["pointing accuracy", "mean energy on mask"]); }
    data.classes.forEach(function (c) { if (data.has_scores) { head.push("pointing: " + c); } });
    t.appendChild(el("thead", {}, [el("tr", {}, head.map(function (h) { return el("th", { text: h }); }))]));
    var body = el("tbody");
    data.summary.forEach(function (s) {
      var tr = el("tr", {}, [el("td", { text: s.method }), el("td", { text: s.layer }),
                              el("td", { cls: "num", text: String(s.n) })]);
      if (data.has_scores) {
        tr.appendChild(el("td", { cls: "num", text: fmt(s.pointing, 3) }));
        tr.appendChild(el("td", { cls: "num", text: fmt(s.energy, 3) }));
        data.classes.forEach(function (c) {
          var pc = s.per_class[c];
          tr.appendChild(el("td", { cls: "num", text: pc ? fmt(pc.pointing, 2) + " (" + pc.n + ")" : "\u2013" }));
        });
      }
      body.appendChild(tr);
    });
    t.appendChild(body);
  }

  // ---------------------------------------------------------------- filters
  function checkboxes(container, name, values) {
    values.forEach(function (v, k) {
      var id = "filter-" + name + "-" + k;
      var box = el("input", { type: "checkbox", id: id, value: v, "data-filter": name });
      box.checked = true;
      box.addEventListener("change", render);
      container.appendChild(el("label", { "for": id }, [box, document.createTextNode(" " + v)]));
    });
  }
  function checked(name) {
    var out = {};
    document.querySelectorAll("input[data-filter='" + name + "']").forEach(function (b) { if (b.checked) { out[b.value] = true; } });
    return out;
  }
  function buildFilters() {
    checkboxes(document.getElementById("filter-methods"), "method", data.methods);
    checkboxes(document.getElementById("filter-layers"), "layer", data.layers);
    var cls = document.getElementById("filter-class");
    cls.appendChild(el("option", { value: "", text: "all classes" }));
    data.classes.forEach(function (c) { cls.appendChild(el("option", { value: c, text: c })); });
    cls.addEventListener("change", render);
    document.getElementById("filter-text").addEventListener("input", render);
    var hit = document.getElementById("filter-hit");
    hit.addEventListener("change", render);
    if (!data.has_scores) { hit.disabled = true; }
    var sort = document.getElementById("sort-key");
    sort.addEventListener("change", function () { state.key = sort.value; render(); });
    document.getElementById("sort-dir").addEventListener("click", function () { state.dir = -state.dir; render(); });
    document.querySelectorAll("#cells th.sortable").forEach(function (th) {
      th.addEventListener("click", function () {
        var k = th.getAttribute("data-key");
        if (state.key === k) { state.dir = -state.dir; } else { state.key = k; state.dir = 1; }
        sort.value = k;
        render();
      });
    });
  }

  function sortValue(c, key) {
    var im = image(c.image);
    switch (key) {
      case "image": return im.name;
      case "method": return c.method;
      case "layer": return data.layers.indexOf(c.layer);
      case "class": return im.target_name;
      case "prob": return im.prob_target;
      case "hit": return c.hit === null ? null : (c.hit ? 1 : 0);
      case "energy": return c.energy;
      default: return null;
    }
  }
  function compare(a, b) {
    var va = sortValue(a, state.key), vb = sortValue(b, state.key);
    if (va === null && vb === null) { return a.order - b.order; }
    if (va === null) { return 1; }              // missing values last, whatever the direction
    if (vb === null) { return -1; }
    if (va < vb) { return -state.dir; }
    if (va > vb) { return state.dir; }
    return a.order - b.order;
  }

  // ---------------------------------------------------------------- the table
  function render() {
    var ms = checked("method"), ls = checked("layer");
    var cls = document.getElementById("filter-class").value;
    var text = document.getElementById("filter-text").value.trim().toLowerCase();
    var hit = document.getElementById("filter-hit").value;
    var rows = data.cells.filter(function (c) {
      var im = image(c.image);
      if (!ms[c.method] || !ls[c.layer]) { return false; }
      if (cls && im.target_name !== cls) { return false; }
      if (text && im.name.toLowerCase().indexOf(text) < 0) { return false; }
      if (hit === "hit" && c.hit !== true) { return false; }
      if (hit === "miss" && c.hit !== false) { return false; }
      return true;
    }).sort(compare);
    var body = document.querySelector("#cells tbody");
    body.textContent = "";
    rows.forEach(function (c) {
      var im = image(c.image);
      var tr = el("tr", { cls: "cell", "data-image": im.name, "data-method": c.method, "data-layer": c.layer }, [
        el("td", {}, [el("img", { cls: "thumb", src: im.thumb, alt: im.name, loading: "eager" })]),
        el("td", {}, [el("img", { cls: "thumb", src: c.src, alt: c.method + " " + c.layer, loading: "eager" })]),
        el("td", { cls: "c-image", text: im.name }),
        el("td", { cls: "c-class", text: im.target_name + (im.correct ? "" : " (pred. " + im.pred_name + ")") }),
        el("td", { cls: "num c-prob", text: fmt(im.prob_target, 3) }),
        el("td", { cls: "c-method", text: c.method }),
        el("td", { cls: "c-layer", text: c.layer }),
        hitCell(c.hit),
        el("td", { cls: "num c-energy", text: fmt(c.energy, 3) })
      ]);
      body.appendChild(tr);
    });
    document.getElementById("count").textContent = rows.length + " of " + data.cells.length + " maps shown";
    document.querySelectorAll("#cells th.sortable").forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.getAttribute("data-key") === state.key) { th.classList.add(state.dir > 0 ? "sorted-asc" : "sorted-desc"); }
    });
    document.getElementById("sort-dir").textContent = state.dir > 0 ? "ascending" : "descending";
  }

  // ---------------------------------------------------------------- side by side
  function buildCompare() {
    var a = document.getElementById("cmp-a"), b = document.getElementById("cmp-b"), l = document.getElementById("cmp-layer");
    data.methods.forEach(function (m) { a.appendChild(el("option", { value: m, text: m })); b.appendChild(el("option", { value: m, text: m })); });
    data.layers.forEach(function (x) { l.appendChild(el("option", { value: x, text: x })); });
    if (data.methods.length > 1) { b.value = data.methods[1]; }
    [a, b, l].forEach(function (s) { s.addEventListener("change", renderCompare); });
    renderCompare();
  }
  function findCell(i, m, layer) {
    for (var k = 0; k < data.cells.length; k++) {
      var c = data.cells[k];
      if (c.image === i && c.method === m && c.layer === layer) { return c; }
    }
    return null;
  }
  function figure(c, label) {
    var cap = label + (c && c.hit !== null ? " \u2014 " + (c.hit ? "hit" : "miss") + ", energy " + fmt(c.energy, 2) : "");
    return el("figure", {}, [c ? el("img", { cls: "big", src: c.src, alt: label }) : el("span", { text: "no map" }),
                             el("figcaption", { text: cap })]);
  }
  function renderCompare() {
    var a = document.getElementById("cmp-a").value, b = document.getElementById("cmp-b").value;
    var layer = document.getElementById("cmp-layer").value;
    var box = document.getElementById("compare");
    box.textContent = "";
    data.images.forEach(function (im, i) {
      var row = el("tr", { cls: "cmp-row" }, [
        el("td", {}, [el("figure", {}, [el("img", { cls: "big", src: im.thumb, alt: im.name }),
                                        el("figcaption", { text: im.name + ": " + im.caption })])]),
        el("td", {}, [figure(findCell(i, a, layer), a + " @ " + layer)]),
        el("td", {}, [figure(findCell(i, b, layer), b + " @ " + layer)])
      ]);
      box.appendChild(row);
    });
  }

  buildSummary();
  buildFilters();
  render();
  buildCompare();
  document.body.setAttribute("data-ready", "1");
})();
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<h1>__TITLE__</h1>
<p class="meta" id="meta">__META__</p>
<p class="note">__NOTE__</p>

<h2>Summary per method and layer</h2>
<table id="summary"></table>

<h2>Maps</h2>
<div class="controls">
  <fieldset><legend>Methods</legend><div id="filter-methods"></div></fieldset>
  <fieldset><legend>Layers</legend><div id="filter-layers"></div></fieldset>
  <fieldset><legend>Image</legend>
    <input id="filter-text" type="search" placeholder="name contains" aria-label="image name contains">
    <select id="filter-class" aria-label="class"></select>
    <select id="filter-hit" aria-label="pointing">
      <option value="">hits and misses</option><option value="hit">pointing hits</option><option value="miss">pointing misses</option>
    </select>
  </fieldset>
  <fieldset><legend>Sort</legend>
    <select id="sort-key" aria-label="sort by">
      <option value="image">image</option><option value="class">class</option><option value="prob">probability</option>
      <option value="method">method</option><option value="layer">layer (depth)</option>
      <option value="hit">pointing hit</option><option value="energy">energy on mask</option>
    </select>
    <button id="sort-dir" type="button">ascending</button>
  </fieldset>
</div>
<p id="count"></p>
<table id="cells">
  <thead><tr>
    <th>image</th><th>map</th>
    <th class="sortable" data-key="image">name</th><th class="sortable" data-key="class">class</th>
    <th class="sortable" data-key="prob">p(class)</th><th class="sortable" data-key="method">method</th>
    <th class="sortable" data-key="layer">layer</th><th class="sortable" data-key="hit">pointing</th>
    <th class="sortable" data-key="energy">energy on mask</th>
  </tr></thead>
  <tbody></tbody>
</table>

<h2>Side by side</h2>
<div class="controls">
  <label>method A <select id="cmp-a"></select></label>
  <label>method B <select id="cmp-b"></select></label>
  <label>layer <select id="cmp-layer"></select></label>
</div>
<table><tbody id="compare"></tbody></table>

<script type="application/json" id="report-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""
