// Sortable tables: a click on a header sorts the rows by that column; a second click reverses the order.
// Cells sort by data-sort (numbers as numbers when the whole column is numeric); empty cells stay last.
(function () {
  "use strict";
  function key(row, col) { return row.cells[col] ? row.cells[col].getAttribute("data-sort") || "" : ""; }
  function sortBy(table, th, col) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function (r) { var v = key(r, col); return v === "" || !isNaN(Number(v)); });
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }
      var d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tBodies.length) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sortBy(table, th, col); } });
    });
  });
}());
