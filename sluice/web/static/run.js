// One run: live counters, timeline and throughput chart from its lifecycle events
// (GET /api/v1/runs/{id}/events), rejected rows, items, cancel and retry.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const REJECTED_PER_PAGE = 25;
  const $ = (id) => document.getElementById(id);

  let run = Sluice.pageData().run;
  const events = [];
  let rejectedPage = 1;
  const SOURCE_COLUMNS = "_sluice_columns"; // a wide row's columns in the file's order
  const loadedFinished = Sluice.TERMINAL.has(run.status);
  let finished = loadedFinished;

  // ------------------------------------------------------------------ summary

  function currentRate() {
    if (Sluice.TERMINAL.has(run.status)) return Sluice.averageRate(run);
    const [a, b] = events.slice(-2);
    if (!a || !b) return Sluice.averageRate(run);
    const seconds = (Date.parse(b.time) - Date.parse(a.time)) / 1000;
    return seconds > 0 ? Math.max(0, (b.counters.processed_rows - a.counters.processed_rows) / seconds) : null;
  }

  function showRun() {
    Sluice.setBadge($("run-status").querySelector(".badge"), run.status);
    document.querySelector(".summary").dataset.status = run.status;
    Sluice.setProgress($("run-progress"), $("run-pct"), run);
    $("run-rate").textContent = `${Sluice.rate(currentRate())} rows/s`;
    for (const dd of document.querySelectorAll("[data-counter]")) {
      dd.textContent = Sluice.num(run[dd.dataset.counter]);
    }
    $("t-started").replaceChildren(Sluice.timeElement(run.started_at));
    $("t-completed").replaceChildren(Sluice.timeElement(run.completed_at));
    if (run.started_at) {
      const end = run.completed_at ? Date.parse(run.completed_at) : Date.now();
      $("t-duration").textContent = Sluice.duration((end - Date.parse(run.started_at)) / 1000);
    }
    const terminal = Sluice.TERMINAL.has(run.status);
    $("cancel").hidden = terminal;
    $("retry").hidden = !(terminal && (run.failed_rows > 0 || run.items_failed > 0));
    $("csv").hidden = !(run.failed_rows > 0);
    $("run-error").hidden = !run.error;
    $("run-error").classList.toggle("error", run.status === "failed");
    $("run-error").classList.toggle("note", run.status !== "failed");
    $("run-error").textContent = run.error || "";
  }

  function message(text, isError = false, link = null) {
    const el = $("action-message");
    el.classList.toggle("error", isError);
    el.replaceChildren(text);
    if (link) el.append(" ", link);
  }

  // ------------------------------------------------------------------ timeline and chart

  function describe(event) {
    const c = event.counters;
    if (event.error) return event.error;
    const parts = [`${Sluice.num(c.processed_rows)}${c.total_rows !== null ? ` / ${Sluice.num(c.total_rows)}` : ""} rows`];
    if (c.failed_rows) parts.push(`${Sluice.num(c.failed_rows)} rejected`);
    if (c.items_discovered) parts.push(`${Sluice.num(c.items_completed)} / ${Sluice.num(c.items_discovered)} items`);
    return parts.join(" · ");
  }

  function addToTimeline(event) {
    $("timeline-empty").hidden = true;
    const item = Sluice.h(
      "li",
      { "data-type": event.type, "data-final": Sluice.FINAL_TYPES.has(event.type) },
      Sluice.h("time", { datetime: event.time, title: event.time, text: Sluice.clock(event.time) }),
      Sluice.h("span", { class: "type", text: event.type }),
      Sluice.h("span", { class: "detail", text: describe(event) }),
    );
    const list = $("timeline");
    const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.append(item);
    if (atEnd) list.scrollTop = list.scrollHeight;
  }

  // Rows per second in each interval between two consecutive events: a step line.
  function throughput() {
    const steps = [];
    for (let i = 1; i < events.length; i++) {
      const a = events[i - 1];
      const b = events[i];
      const seconds = (Date.parse(b.time) - Date.parse(a.time)) / 1000;
      if (seconds <= 0) continue;
      const rows = b.counters.processed_rows - a.counters.processed_rows;
      steps.push({ from: a.time, to: b.time, rate: Math.max(0, rows / seconds) });
    }
    return steps;
  }

  function niceCeiling(value) {
    if (value <= 0) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * power) return m * power;
    return 10 * power;
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  let drawPending = false;
  function drawChart() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      const box = $("chart");
      const steps = throughput();
      // A run that ended without progress events has no throughput to show: no empty chart.
      box.closest("section").hidden = !steps.length && ["failed", "cancelled"].includes(run.status);
      if (!steps.length) {
        box.replaceChildren(Sluice.h("p", { class: "empty", text: "No progress yet." }));
        return;
      }
      const width = Math.max(box.clientWidth, 200);
      const height = box.clientHeight || 190;
      const m = { left: 56, right: 12, top: 10, bottom: 22 };
      const t0 = Date.parse(steps[0].from);
      const span = Math.max((Date.parse(steps[steps.length - 1].to) - t0) / 1000, 0.001);
      const top = niceCeiling(Math.max(...steps.map((s) => s.rate)));
      const x = (iso) => m.left + ((Date.parse(iso) - t0) / 1000 / span) * (width - m.left - m.right);
      const y = (rate) => m.top + (1 - rate / top) * (height - m.top - m.bottom);

      const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height });
      for (const fraction of [0, 0.5, 1]) {
        const gy = y(top * fraction);
        chart.append(svg("line", { class: "grid-line", x1: m.left, x2: width - m.right, y1: gy, y2: gy }));
        chart.append(svg("text", { x: m.left - 6, y: gy + 4, "text-anchor": "end" }, Sluice.num(top * fraction)));
      }
      let line = "";
      for (const [i, s] of steps.entries()) {
        line += `${i ? "L" : "M"}${x(s.from).toFixed(1)},${y(s.rate).toFixed(1)}H${x(s.to).toFixed(1)}`;
      }
      const base = y(0).toFixed(1);
      const area = `M${x(steps[0].from).toFixed(1)},${base}${line.replace(/^M/, "L")}V${base}Z`;
      chart.append(svg("path", { class: "area", d: area }));
      chart.append(svg("path", { class: "line", d: line }));
      chart.append(svg("text", { x: m.left, y: height - 4 }, "0 s"));
      chart.append(svg("text", { x: width - m.right, y: height - 4, "text-anchor": "end" }, Sluice.duration(span)));
      chart.append(svg("text", { x: (m.left + width) / 2, y: height - 4, "text-anchor": "middle" }, "rows/s over time"));
      box.replaceChildren(chart);
    });
  }

  // ------------------------------------------------------------------ rejected rows, items

  async function loadRejected(page = rejectedPage) {
    if (!(run.failed_rows > 0)) return;
    $("rejected").hidden = false;
    let result;
    try {
      result = await Sluice.api(
        `/api/v1/runs/${run.id}/failed-rows?page=${page}&limit=${REJECTED_PER_PAGE}`,
      );
    } catch (error) {
      $("rejected-count").textContent = `could not load them: ${error.message}`;
      return;
    }
    rejectedPage = page;
    const { total, totalPages } = result.pagination;
    $("rejected-count").textContent = `${Sluice.num(total)} row${total === 1 ? "" : "s"}`;
    // The rows as a table of their columns (the file's order where the row log kept it),
    // not as JSON: a row whose raw value is no object shows it in one "Value" column.
    const columns = [];
    const seen = new Set();
    for (const row of result.data) {
      const raw = row.raw;
      const keys = raw && typeof raw === "object" && !Array.isArray(raw)
        ? (raw[SOURCE_COLUMNS] || Object.keys(raw))
        : ["Value"];
      for (const key of keys) {
        if (key !== SOURCE_COLUMNS && !seen.has(key)) {
          seen.add(key);
          columns.push(key);
        }
      }
    }
    $("rejected-head").replaceChildren(
      Sluice.h("th", { class: "num", text: "Row" }),
      Sluice.h("th", { text: "Reason" }),
      ...columns.map((column) => Sluice.h("th", { class: "col", text: column })),
    );
    const cell = (value) => {
      if (value === null || value === undefined) return "";
      const text = typeof value === "string" ? value : JSON.stringify(value);
      return text.length > 120 ? `${text.slice(0, 120)}…` : text;
    };
    $("rejected-body").replaceChildren(
      ...result.data.map((row) => {
        const raw = row.raw;
        const values = raw && typeof raw === "object" && !Array.isArray(raw) ? raw : { Value: raw };
        return Sluice.h(
          "tr",
          { "data-row": row.row_number },
          Sluice.h("td", { class: "num", text: row.sub ? `${row.row_number}.${row.sub}` : row.row_number }),
          Sluice.h("td", { class: "reason", text: row.reason }),
          ...columns.map((column) => Sluice.h("td", { class: "raw", "data-column": column, text: cell(values[column]) })),
        );
      }),
    );
    $("rejected-page").textContent = `Page ${page} of ${Math.max(totalPages, 1)}`;
    $("rejected-prev").disabled = page <= 1;
    $("rejected-next").disabled = page >= totalPages;
  }

  async function loadItems() {
    if (!$("items")) return;
    try {
      const failed = await Sluice.api(`/api/v1/runs/${run.id}/items?status=failed&limit=100`);
      const counts = Object.entries(failed.counts).map(([k, v]) => `${k} ${Sluice.num(v)}`);
      $("items-counts").textContent = counts.join(" · ");
      const shown = failed.data.length
        ? failed.data
        : (await Sluice.api(`/api/v1/runs/${run.id}/items?limit=20`)).data;
      $("items-body").replaceChildren(
        ...shown.map((item) =>
          Sluice.h(
            "tr",
            {},
            Sluice.h("td", { class: "raw", text: item.external_id }),
            Sluice.h("td", {}, Sluice.h("span", { class: "badge", "data-status": item.status === "failed" ? "failed" : item.status === "completed" ? "completed" : "", text: item.status })),
            Sluice.h("td", { class: "num", text: item.failure_count }),
            Sluice.h("td", { text: item.last_error || "" }),
          ),
        ),
      );
    } catch (error) {
      $("items-counts").textContent = `could not load them: ${error.message}`;
    }
  }

  // ------------------------------------------------------------------ actions

  $("cancel").addEventListener("click", async () => {
    if (!window.confirm("Cancel this run? Rows already applied stay in the table.")) return;
    $("cancel").disabled = true;
    try {
      run = await Sluice.api(`/api/v1/runs/${run.id}/cancel`, { method: "POST" });
      message("Cancelled.");
      showRun();
    } catch (error) {
      message(error.message, true);
    } finally {
      $("cancel").disabled = false;
    }
  });

  $("retry").addEventListener("click", async () => {
    $("retry").disabled = true;
    try {
      const child = await Sluice.api(`/api/v1/runs/${run.id}/retry`, { method: "POST" });
      const link = Sluice.h("a", { href: `/ui/runs/${child.id}`, text: child.id.slice(0, 8) });
      const badge = Sluice.h("span", { class: "badge" });
      Sluice.setBadge(badge, child.status);
      $("related").append(Sluice.h("li", { class: "child" }, "Retried in ", link, " ", badge));
      $("no-related").hidden = true;
      message("Retry started:", false, link.cloneNode(true));
    } catch (error) {
      message(error.message, true);
    } finally {
      $("retry").disabled = false;
    }
  });

  $("rejected-prev").addEventListener("click", () => loadRejected(rejectedPage - 1));
  $("rejected-next").addEventListener("click", () => loadRejected(rejectedPage + 1));
  window.addEventListener("resize", drawChart);

  // ------------------------------------------------------------------ live

  async function refresh() {
    try {
      run = await Sluice.api(`/api/v1/runs/${run.id}`);
    } catch (error) {
      console.warn("could not reload the run", error);
    }
    showRun();
  }

  // "What it read", for a page opened before the split read the file: asked for again at
  // each event until the server has it (at most one request at a time).
  let askingProvenance = false;
  async function loadProvenance() {
    const slot = $("provenance-slot");
    if (!slot || askingProvenance) return;
    askingProvenance = true;
    try {
      const response = await fetch(`/ui/runs/${run.id}/provenance`, { credentials: "same-origin" });
      if (response.status === 200 && $("provenance-slot")) {
        const holder = document.createElement("div");
        holder.innerHTML = await response.text();
        slot.replaceWith(...holder.children);
      }
    } catch (error) {
      console.warn("could not load what the run read", error);
    } finally {
      askingProvenance = false;
    }
  }

  const source = Sluice.follow(`/api/v1/runs/${run.id}/events`, (event) => {
    events.push(event);
    loadProvenance();
    addToTimeline(event);
    // A run that had finished when the page loaded keeps its final counters while the
    // timeline replays; a live one takes each event's. The status only moves forward.
    if (!loadedFinished || Sluice.FINAL_TYPES.has(event.type)) {
      run = { ...run, ...event.counters, error: event.error ?? run.error };
      if (!Sluice.TERMINAL.has(run.status) || Sluice.FINAL_TYPES.has(event.type)) run.status = event.status;
    }
    if (event.type === "run.started" && !run.started_at) run.started_at = event.time;
    showRun();
    drawChart();
    if (Sluice.FINAL_TYPES.has(event.type)) {
      source.close(); // the stream ends after the final event; do not reconnect
      refresh().then(() => {
        if (!finished) loadRejected(1);
        finished = true;
        loadItems();
      });
    }
  });
  window.addEventListener("pagehide", () => source.close());

  showRun();
  drawChart();
  if (finished) loadRejected(1);
  loadItems();
})();
