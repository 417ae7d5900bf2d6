// The sample browser. The list: one row per sample, filtered by the text box (every word must appear in the
// sample's id, question, answers, documents, surrogates or generated answers) and sorted by a click on a column
// header (first click ascending: on a delta column, the samples where that condition loses most come first).
// A click on a row shows the sample: its documents (the gold one marked), question, answers, and per condition
// the surrogate, NLL, delta against the baseline, generated answer and per-token answer NLL.
// Texts are set with textContent only, so a document holding HTML shows as text and never runs.
(function () {
  "use strict";
  var root = document.getElementById("browser");
  var data = JSON.parse(document.getElementById("sample-data").textContent);
  var tie = Number(root.getAttribute("data-tie")) || 0;
  var texts = data.texts, samples = data.samples, base = data.baseline;
  var treated = data.conditions.filter(function (c) { return c !== base; });
  var table = document.getElementById("sample-list");
  var filter = document.getElementById("sample-filter");
  var count = document.getElementById("sample-count");
  var detail = document.getElementById("sample-detail");
  var state = {col: null, asc: true, selected: null};

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function has(x) { return x !== undefined && x !== null; }
  function fixed(x, digits) { return has(x) ? Number(x).toFixed(digits) : ""; }
  function signed(x) { return has(x) ? (x > 0 ? "+" : "") + Number(x).toFixed(4) : ""; }
  function deltaClass(x) { return has(x) ? (x > tie ? "pos" : (x < -tie ? "neg" : "")) : ""; }
  function entry(s, c) { return (s.scores || {})[c] || null; }

  // The list's columns: [header, value of a sample (what it sorts by), text, class].
  var columns = [
    ["#", function (s) { return s.index; }, function (s) { return s.index + 1; }],
    ["sample", function (s) { return s.id; }, function (s) { return s.id; }],
    ["question", function (s) { return s.query; }, function (s) { return s.query; }],
    ["NLL " + base, function (s) { var e = entry(s, base); return e ? e.nll : null; },
     function (s) { var e = entry(s, base); return s.skipped ? "skipped" : fixed(e && e.nll, 4); }]
  ].concat(treated.map(function (c) {
    var value = function (s) { var e = entry(s, c); return e ? e.delta : null; };
    return ["\u0394 " + c, value, function (s) { return signed(value(s)); },
            function (s) { return deltaClass(value(s)); }, c];
  }));

  function haystack(s) {
    if (s.hay === undefined) {
      var parts = [s.id, s.query, s.answer].concat(s.answers || []);
      (s.docs || []).forEach(function (d) { parts.push(texts[d]); });
      Object.keys(s.scores || {}).forEach(function (c) {
        var e = s.scores[c];
        if (has(e.surrogate)) { parts.push(texts[e.surrogate]); }
        if (has(e.answer)) { parts.push(e.answer); }
      });
      s.hay = parts.join("\n").toLowerCase();
    }
    return s.hay;
  }

  function compare(col, asc) {
    return function (a, b) {
      var x = col[1](a), y = col[1](b);
      if (!has(x) || !has(y)) { return has(x) === has(y) ? a.index - b.index : (has(x) ? -1 : 1); }
      var d = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return (asc ? d : -d) || a.index - b.index;
    };
  }

  function header() {
    var tr = el("tr");
    columns.forEach(function (col, i) {
      var th = el("th", col[0]);
      th.setAttribute("scope", "col");
      th.setAttribute("tabindex", "0");
      if (col[4]) { th.setAttribute("data-condition", col[4]); th.title = "delta = " + base + " NLL - " + col[4] +
        " NLL (positive: " + col[4] + " better); first click: where it loses most"; }
      if (state.col === i) { th.setAttribute("aria-sort", state.asc ? "ascending" : "descending"); }
      var sort = function () {
        state.asc = state.col === i ? !state.asc : true;
        state.col = i;
        render();
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(); } });
      tr.appendChild(th);
    });
    table.tHead.textContent = "";
    table.tHead.appendChild(tr);
  }

  function render() {
    var terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = samples.filter(function (s) {
      var h = haystack(s);
      return terms.every(function (t) { return h.indexOf(t) >= 0; });
    });
    if (state.col !== null) { rows.sort(compare(columns[state.col], state.asc)); }
    header();
    var body = table.tBodies[0];
    body.textContent = "";
    rows.forEach(function (s) {
      var tr = el("tr", null, s === state.selected ? "selected" : "");
      tr.setAttribute("data-id", s.id);
      columns.forEach(function (col) { tr.appendChild(el("td", col[2](s), col[3] ? col[3](s) : "")); });
      tr.addEventListener("click", function () { show(s); });
      body.appendChild(tr);
    });
    count.textContent = rows.length + " of " + samples.length + " samples";
  }

  function documents(s) {
    var docs = s.docs || [];
    var box = el("div");
    box.appendChild(el("h4", docs.length > 1 ? docs.length + " documents, in context order" : "Document"));
    docs.forEach(function (d, i) {
      var gold = has(s.gold) && i === s.gold;
      var doc = el("div", null, "doc" + (gold ? " gold" : ""));
      if (docs.length > 1) { doc.appendChild(el("span", "document " + (i + 1) + (gold ? " (gold)" : ""), "label")); }
      doc.appendChild(document.createTextNode(texts[d]));
      box.appendChild(doc);
    });
    return box;
  }

  function conditionTable(s, conds) {
    var fields = [["routed_to", "routed to"], ["similarity", "similarity"], ["answer", "generated answer"],
                  ["em", "EM"], ["f1", "F1"], ["contains", "contains"]].filter(function (f) {
      return conds.some(function (c) { return has(entry(s, c)[f[0]]); });
    });
    var t = el("table");
    t.id = "sample-conditions";
    var head = el("tr");
    ["condition", "surrogate", "NLL", "delta vs " + base].concat(fields.map(function (f) { return f[1]; }))
      .forEach(function (h) { head.appendChild(el("th", h)); });
    t.appendChild(el("thead")).appendChild(head);
    var body = t.appendChild(el("tbody"));
    conds.forEach(function (c) {
      var e = entry(s, c), tr = el("tr");
      tr.setAttribute("data-condition", c);
      tr.appendChild(el("td", c));
      tr.appendChild(el("td", has(e.surrogate) ? texts[e.surrogate] : "", "surrogate"));
      tr.appendChild(el("td", fixed(e.nll, 4)));
      tr.appendChild(el("td", c === base ? "(baseline)" : signed(e.delta), deltaClass(e.delta)));
      fields.forEach(function (f) {
        var v = e[f[0]];
        tr.appendChild(el("td", typeof v === "number" ? fixed(v, f[0] === "similarity" ? 4 : 2) : v));
      });
      body.appendChild(tr);
    });
    return t;
  }

  function tokens(s, conds) {
    var shown = conds.filter(function (c) { return entry(s, c).token_nll; });
    var box = el("div");
    if (!shown.length) { return box; }
    var max = 0;
    shown.forEach(function (c) { entry(s, c).token_nll.forEach(function (v) { if (v > max) { max = v; } }); });
    box.appendChild(el("h4", "Per-token answer NLL"));
    box.appendChild(el("p", "Nats per answer token, by token index (upper number); the darker the cell, the higher " +
      "the NLL, scaled to this sample's largest (" + fixed(max, 3) + ").", "muted"));
    var t = el("table");
    shown.forEach(function (c) {
      var tr = el("tr");
      tr.appendChild(el("th", c));
      var td = el("td"), cells = el("div", null, "tokens");
      entry(s, c).token_nll.forEach(function (v, i) {
        var tok = el("span", null, "tok");
        tok.appendChild(el("span", i, "i"));
        tok.appendChild(document.createTextNode(fixed(v, 3)));
        tok.style.backgroundColor = "rgba(220, 53, 69, " + (max > 0 ? 0.85 * v / max : 0).toFixed(3) + ")";
        tok.title = "answer token " + i + (s.answer_ids ? " (id " + s.answer_ids[i] + ")" : "") + ": " + v + " nats";
        cells.appendChild(tok);
      });
      td.appendChild(cells);
      tr.appendChild(td);
      t.appendChild(tr);
    });
    box.appendChild(t);
    return box;
  }

  function show(s) {
    state.selected = s;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      r.className = r.getAttribute("data-id") === s.id ? "selected" : "";
    });
    detail.textContent = "";
    detail.setAttribute("data-id", s.id);
    detail.appendChild(el("h3", "Sample " + s.id));
    if (s.skipped) { detail.appendChild(el("p", "Not scored: " + s.skipped, "muted")); }
    var qa = el("dl", null, "header");
    qa.appendChild(el("dt", "Question"));
    qa.appendChild(el("dd", s.query));
    qa.appendChild(el("dt", "Reference answer (scored)"));
    qa.appendChild(el("dd", s.answer));
    if (s.answers && s.answers.length) {
      qa.appendChild(el("dt", "Other accepted answers"));
      qa.appendChild(el("dd", s.answers.join(" | ")));
    }
    detail.appendChild(qa);
    detail.appendChild(documents(s));
    var conds = data.conditions.filter(function (c) { return entry(s, c); });
    if (conds.length) {
      detail.appendChild(el("h4", "Conditions"));
      detail.appendChild(el("div", null, "table-wrap")).appendChild(conditionTable(s, conds));
      detail.appendChild(tokens(s, conds));
    }
  }

  samples.forEach(function (s, i) { s.index = i; });
  filter.addEventListener("input", render);
  render();
  if (samples.length) { show(samples[0]); }
}());
