// The feature browser's page logic: a paginated, sortable, searchable table of latents and a panel per latent.
// Data arrive as <script src> files calling saelabIndex(...) and saelabChunk(...) (JSONP style), because
// Chromium refuses fetch() on file:// pages. Every piece of data text is set with textContent, never parsed as HTML.
(function () {
  "use strict";
  var PAGE_SIZE = 50;
  var index = null;
  var chunks = {};
  var waiting = {};
  var order = [];
  var state = {sort: "latent", dir: "asc", q: "", page: 0, latent: null};
  var fixed = ["latent", "density", "count", "max"];

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") { node.textContent = attrs[key]; } else { node.setAttribute(key, attrs[key]); }
    });
    (children || []).forEach(function (child) { if (child) { node.appendChild(child); } });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) { return ""; }
    if (x === 0) { return "0"; }
    var a = Math.abs(x);
    if (a >= 1e-3 && a < 1e5) { return String(Number(x.toPrecision(4))); }
    return x.toExponential(3);
  }

  function pad(n) { return ("00000" + n).slice(-5); }

  function density(latent) { return index.count[latent] / index.n_tokens; }

  function explanation(latent) { return index.explanation[String(latent)] || ""; }

  function columns() { return fixed.concat(Object.keys(index.scores)); }

  function value(key, latent) {
    if (key === "latent") { return latent; }
    if (key === "density" || key === "count") { return index.count[latent]; }
    if (key === "max") { return index.max[latent]; }
    var v = index.scores[key][String(latent)];
    return v === undefined ? null : v;
  }

  // ---- URL state ------------------------------------------------------------------------------------------

  function readHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    if (columns().indexOf(params.get("sort")) >= 0) { state.sort = params.get("sort"); }
    state.dir = params.get("dir") === "desc" ? "desc" : "asc";
    state.q = params.get("q") || "";
    state.page = Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
    var latent = parseInt(params.get("latent"), 10);
    state.latent = latent >= 0 && latent < index.n_latents ? latent : null;
  }

  function hashFor(changes) {
    var next = Object.assign({}, state, changes);
    var params = new URLSearchParams({sort: next.sort, dir: next.dir, q: next.q, page: String(next.page)});
    if (next.latent !== null) { params.set("latent", String(next.latent)); }
    return "#" + params.toString();
  }

  // ---- the table ------------------------------------------------------------------------------------------

  function computeOrder() {
    var query = state.q.trim().toLowerCase();
    var asNumber = /^\d+$/.test(query) ? parseInt(query, 10) : null;
    order = [];
    for (var latent = 0; latent < index.n_latents; latent++) {
      if (query === "" || latent === asNumber || explanation(latent).toLowerCase().indexOf(query) >= 0) {
        order.push(latent);
      }
    }
    var sign = state.dir === "desc" ? -1 : 1;
    var key = state.sort;
    order.sort(function (a, b) {
      var x = value(key, a), y = value(key, b);
      if (x === null || y === null) { return (x === null) - (y === null) || a - b; }
      return sign * (x - y) || a - b;
    });
  }

  function renderTable() {
    var pages = Math.max(1, Math.ceil(order.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    var head = $("latents").tHead.rows[0];
    Array.prototype.forEach.call(head.cells, function (th) {
      var key = th.getAttribute("data-key");
      if (key) {
        th.setAttribute("aria-sort", key === state.sort ? (state.dir === "asc" ? "ascending" : "descending") : "none");
      }
    });
    var body = el("tbody");
    order.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).forEach(function (latent) {
      var row = el("tr", {"data-latent": String(latent)});
      if (latent === state.latent) { row.className = "selected"; }
      row.appendChild(el("td", {"class": "num"}, [el("a", {href: hashFor({latent: latent}), text: String(latent)})]));
      row.appendChild(el("td", {"class": "num", "data-value": String(density(latent)), text: fmt(density(latent))}));
      row.appendChild(el("td", {"class": "num", text: String(index.count[latent])}));
      row.appendChild(el("td", {"class": "num", "data-value": String(index.max[latent]), text: fmt(index.max[latent])}));
      Object.keys(index.scores).forEach(function (name) {
        var v = value(name, latent);
        row.appendChild(el("td", {"class": "num", text: v === null ? "" : fmt(v)}));
      });
      row.appendChild(el("td", {"class": "explanation", text: explanation(latent)}));
      body.appendChild(row);
    });
    $("latents").replaceChild(body, $("latents").tBodies[0]);
    $("shown").textContent = order.length + " of " + index.n_latents + " latents; page " + (state.page + 1) +
      " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
  }

  function buildHead() {
    var row = $("latents").tHead.rows[0];
    var labels = {latent: "latent", density: "density", count: "count", max: "max act."};
    columns().forEach(function (key) {
      row.appendChild(el("th", {"data-key": key, "aria-sort": "none", title: "sort by " + key,
                                text: labels[key] || key}));
    });
    row.appendChild(el("th", {text: "explanation"}));
  }

  // ---- the latent panel -----------------------------------------------------------------------------------

  function loadChunk(number, done) {
    if (chunks[number]) { done(chunks[number]); return; }
    if (waiting[number]) { waiting[number].push(done); return; }
    waiting[number] = [done];
    var script = el("script", {src: "data/chunk_" + pad(number) + ".js"});
    script.onerror = function () {
      delete waiting[number];
      $("panel").replaceChildren(el("p", {"class": "note", text: "could not load data/chunk_" + pad(number) +
        ".js; is the features folder complete?"}));
    };
    document.head.appendChild(script);
  }

  window.saelabChunk = function (chunk) {
    chunks[chunk.chunk] = chunk;
    (waiting[chunk.chunk] || []).forEach(function (done) { done(chunk); });
    delete waiting[chunk.chunk];
  };

  function histogram(edges, counts, label) {
    var width = 420, height = 110, top = Math.max.apply(null, counts), bar = width / counts.length;
    var box = svg("svg", {"class": "histogram", width: width, height: height + 18, role: "img", "aria-label": label});
    counts.forEach(function (count, i) {
      var h = top > 0 ? height * count / top : 0;
      var rect = svg("rect", {"class": "bar", x: (i * bar).toFixed(2), y: (height - h).toFixed(2),
                              width: Math.max(bar - 1, 1).toFixed(2), height: h.toFixed(2), "data-count": count});
      var title = svg("title", {});
      title.textContent = "[" + fmt(edges[i]) + ", " + fmt(edges[i + 1]) + "): " + count;
      rect.appendChild(title);
      box.appendChild(rect);
    });
    var low = svg("text", {x: 0, y: height + 14, "font-size": 11});
    low.textContent = fmt(edges[0]);
    var high = svg("text", {x: width, y: height + 14, "font-size": 11, "text-anchor": "end"});
    high.textContent = fmt(edges[edges.length - 1]);
    box.appendChild(low);
    box.appendChild(high);
    return box;
  }

  function windowNode(win, strings, scale) {
    var box = el("div", {"class": "ctx", title: "context " + win.context + ", from position " + win.start});
    win.tokens.forEach(function (id, i) {
      var act = win.acts[i];
      var span = el("span", {"class": act > 0 ? "tok act" : "tok", text: strings[id].replace(/\n/g, "\u21b5")});
      if (act > 0) {
        span.setAttribute("data-act", String(act));
        span.setAttribute("title", "activation " + fmt(act));
        span.style.background = "rgba(255,136,0," + Math.min(1, 0.15 + 0.85 * act / scale).toFixed(3) + ")";
      }
      box.appendChild(span);
    });
    return box;
  }

  function logitTable(cls, heading, rows, strings) {
    var body = el("tbody");
    rows.forEach(function (row) {
      body.appendChild(el("tr", {}, [el("td", {"class": "tok", text: strings[row[0]]}),
        el("td", {"class": "num", "data-value": String(row[1]), text: (row[1] > 0 ? "+" : "") + fmt(row[1])})]));
    });
    return el("table", {"class": "logits " + cls}, [el("thead", {}, [el("tr", {}, [
      el("th", {colspan: "2", text: heading})])]), body]);
  }

  function layerTable(norms) {
    var body = el("tbody");
    var top = Math.max.apply(null, norms.encoder.concat(norms.decoder)) || 1;
    index.layers.forEach(function (layer, i) {
      var cells = [el("td", {"class": "num", text: String(layer)})];
      ["encoder", "decoder"].forEach(function (which) {
        var v = norms[which][i];
        cells.push(el("td", {"class": "num " + which, "data-value": String(v)}, [
          el("span", {"class": "normbar " + which, style: "width:" + (60 * v / top).toFixed(1) + "px"}),
          el("span", {text: " " + fmt(v)})]));
      });
      body.appendChild(el("tr", {}, cells));
    });
    return el("table", {"class": "layers"}, [el("thead", {}, [el("tr", {}, [el("th", {text: "layer"}),
      el("th", {text: "encoder norm"}), el("th", {text: "decoder norm"})])]), body]);
  }

  function renderPanel(latent, chunk) {
    var entry = chunk.latents[String(latent)];
    var strings = chunk.strings;
    var parts = [el("h2", {text: "Latent " + latent})];
    var stats = [["count", String(entry.count)], ["density", fmt(entry.count / index.n_tokens)],
                 ["max activation", fmt(entry.max)]];
    if (explanation(latent)) { stats.push(["explanation", explanation(latent)]); }
    Object.keys(index.scores).forEach(function (name) {
      var v = value(name, latent);
      if (v !== null) { stats.push([name, fmt(v)]); }
    });
    parts.push(el("table", {"class": "stats"}, [el("tbody", {}, stats.map(function (pair) {
      return el("tr", {}, [el("th", {text: pair[0]}), el("td", {"data-name": pair[0], text: pair[1]})]);
    }))]));
    if (entry.layers) {
      parts.push(el("h3", {text: "Encoder and decoder norm per layer"}), layerTable(entry.layers));
    }
    if (!entry.count) {
      parts.push(el("p", {"class": "note", text: "This latent never fires on the " + index.n_tokens +
        " recorded tokens (dead)."}));
      $("panel").replaceChildren.apply($("panel"), parts);
      $("panel").setAttribute("data-latent", String(latent));
      return;
    }
    parts.push(el("h3", {text: "Activation histogram"}),
               histogram(entry.histogram.edges, entry.histogram.counts, "histogram of nonzero activations"));
    if (entry.logits) {
      parts.push(el("h3", {text: "Logit effects of the decoder direction"}),
                 el("div", {"class": "logit-pair"}, [logitTable("positive", "promoted", entry.logits.top, strings),
                   logitTable("negative", "suppressed", entry.logits.bottom, strings)]));
    }
    parts.push(el("h3", {text: "Top activations"}));
    entry.top.forEach(function (win) { parts.push(windowNode(win, strings, entry.max)); });
    for (var q = entry.quantiles.length - 1; q >= 0; q--) {
      if (!entry.quantiles[q].length) { continue; }
      parts.push(el("h3", {text: "Quantile " + (q + 1) + " of " + entry.quantiles.length + " (1 = weakest)"}));
      entry.quantiles[q].forEach(function (win) { parts.push(windowNode(win, strings, entry.max)); });
    }
    var panel = $("panel");
    panel.replaceChildren.apply(panel, parts);
    panel.setAttribute("data-latent", String(latent));
  }

  function showLatent() {
    var panel = $("panel");
    if (state.latent === null) {
      panel.removeAttribute("data-latent");
      panel.replaceChildren(el("p", {"class": "note", text: "Choose a latent in the table."}));
      return;
    }
    var latent = state.latent;
    panel.removeAttribute("data-latent");
    panel.replaceChildren(el("p", {"class": "note", text: "loading latent " + latent + "\u2026"}));
    loadChunk(Math.floor(latent / index.chunk_size), function (chunk) {
      if (state.latent === latent) { renderPanel(latent, chunk); }
    });
  }

  // ---- wiring ---------------------------------------------------------------------------------------------

  function apply(changes, recompute) {
    Object.assign(state, changes);
    history.replaceState(null, "", hashFor({}));
    if (recompute) { computeOrder(); }
    renderTable();
    showLatent();
  }

  window.saelabIndex = function (data) {
    index = data;
    buildHead();
    readHash();
    $("search").value = state.q;
    computeOrder();
    renderTable();
    showLatent();
    $("latents").tHead.addEventListener("click", function (event) {
      var th = event.target.closest("th[data-key]");
      if (!th) { return; }
      var key = th.getAttribute("data-key");
      var dir = key === state.sort ? (state.dir === "asc" ? "desc" : "asc") : (key === "latent" ? "asc" : "desc");
      apply({sort: key, dir: dir, page: 0}, true);
    });
    $("search").addEventListener("input", function () { apply({q: $("search").value, page: 0}, true); });
    $("prev").addEventListener("click", function () { apply({page: state.page - 1}, false); });
    $("next").addEventListener("click", function () { apply({page: state.page + 1}, false); });
    window.addEventListener("hashchange", function () {
      var before = [state.sort, state.dir, state.q].join("\u0000");
      readHash();
      $("search").value = state.q;
      if ([state.sort, state.dir, state.q].join("\u0000") !== before) { computeOrder(); }
      renderTable();
      showLatent();
    });
    document.body.setAttribute("data-ready", "true");
  };
})();
