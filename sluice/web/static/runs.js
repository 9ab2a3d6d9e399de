// The runs table, kept current by the live lifecycle stream (GET /api/v1/events).
"use strict";

(() => {
  const data = Sluice.pageData();
  const body = document.getElementById("runs-body");
  const template = document.getElementById("run-row");
  const live = document.getElementById("live");
  const empty = document.getElementById("no-runs");
  const last = new Map(); // run id -> {processed, t}: the previous event, for rows/s
  const fetching = new Set();

  const rowOf = (id) => body.querySelector(`tr[data-run-id="${CSS.escape(id)}"]`);
  const wanted = (run) =>
    data.page === 1 &&
    (!data.status || run.status === data.status) &&
    (!data.importer || run.importer === data.importer);

  function setText(tr, selector, value) {
    const el = tr.querySelector(selector);
    if (el) el.textContent = value;
  }

  // Updates the cells of `tr` from a run, or the part of one a lifecycle event carries.
  function label(run) {
    const table = run.options && run.options.table;
    if (run.importer !== "adhoc" || !table) return run.importer;
    const schema = run.options.schema || "public";
    return schema === "public" ? `adhoc:${table}` : `adhoc:${schema}.${table}`;
  }

  function fill(tr, run, rate) {
    tr.dataset.runId = run.id;
    const link = tr.querySelector(".run-link");
    link.href = `/ui/runs/${run.id}`;
    link.textContent = run.id.slice(0, 8);
    if (run.status) {
      tr.dataset.status = run.status;
      Sluice.setBadge(tr.querySelector(".badge"), run.status);
    }
    if (run.started_at) tr.dataset.started = run.started_at;
    // An ad-hoc run shows its table (adhoc:shop), as `sluice runs` does; an event without
    // the run's options keeps what the row shows.
    if ("importer" in run && (run.importer !== "adhoc" || run.options)) {
      setText(tr, ".c-importer", label(run));
    }
    if (run.error) {
      let reason = tr.querySelector(".c-reason");
      if (!reason) {
        reason = Sluice.h("small", { class: "c-reason" });
        tr.querySelector(".c-status").append(reason);
      }
      reason.textContent = run.error.length > 90 ? `${run.error.slice(0, 87)}...` : run.error;
      reason.title = run.error;
    }
    if ("source" in run) setText(tr, ".c-file", run.file_name || run.source);
    if (run.dry_run && !tr.querySelector(".tag")) {
      tr.querySelector(".c-status").append(" ", Sluice.h("span", { class: "tag", text: "dry run" }));
    }
    if ("progress_percent" in run) {
      Sluice.setProgress(tr.querySelector("progress"), tr.querySelector(".pct"), {
        ...run,
        status: tr.dataset.status,
      });
    }
    if ("processed_rows" in run) {
      const total = run.total_rows === null || run.total_rows === undefined
        ? "" : ` / ${Sluice.num(run.total_rows)}`;
      setText(tr, ".c-rows", Sluice.num(run.processed_rows) + total);
      for (const name of ["created", "updated", "unchanged", "skipped", "failed"]) {
        setText(tr, `.c-${name}`, Sluice.num(run[`${name}_rows`]));
      }
    }
    if (rate !== undefined) setText(tr, ".c-rate", Sluice.rate(rate));
    if (run.queued_at) tr.querySelector(".c-queued").replaceChildren(Sluice.timeElement(run.queued_at, { short: true }));
  }

  function newRow(run) {
    const tr = template.content.firstElementChild.cloneNode(true);
    fill(tr, run, Sluice.TERMINAL.has(run.status) ? Sluice.averageRate(run) : undefined);
    tr.classList.add("fresh");
    empty.hidden = true;
    const count = document.getElementById("run-count");
    const total = Number(count.dataset.total) + 1;
    count.dataset.total = total;
    count.textContent = `${Sluice.num(total)} run${total === 1 ? "" : "s"}`;
    return tr;
  }

  async function insertRun(id) {
    if (fetching.has(id)) return;
    fetching.add(id);
    try {
      const run = await Sluice.api(`/api/v1/runs/${id}`);
      if (!rowOf(id) && wanted(run)) body.prepend(newRow(run));
    } catch (error) {
      console.warn("could not load run", id, error);
    } finally {
      fetching.delete(id);
    }
  }

  function onEvent(event) {
    const run = Sluice.eventToRun(event);
    const tr = rowOf(run.id);
    if (!tr) {
      if (wanted(run)) insertRun(run.id);
      return;
    }
    const t = Date.parse(event.time);
    if (event.type === "run.started" || event.type === "backfill.started") {
      tr.dataset.started = event.time;
      last.set(run.id, { processed: 0, t });
    }
    let rate;
    const previous = last.get(run.id);
    if (Sluice.TERMINAL.has(run.status)) {
      const started = tr.dataset.started ? Date.parse(tr.dataset.started) : NaN;
      rate = t > started ? run.processed_rows / ((t - started) / 1000) : undefined;
    } else if (previous && t > previous.t) {
      rate = Math.max(0, (run.processed_rows - previous.processed) / ((t - previous.t) / 1000));
    }
    last.set(run.id, { processed: run.processed_rows, t });
    fill(tr, run, rate);
  }

  // The stream starts at its latest offset: what changed before it opened comes from the API.
  async function reconcile() {
    const params = new URLSearchParams({ page: data.page, limit: data.limit });
    if (data.status) params.set("status", data.status);
    if (data.importer) params.set("importer", data.importer);
    let listing;
    try {
      listing = await Sluice.api(`/api/v1/runs?${params}`);
    } catch (error) {
      console.warn("could not refresh the runs", error);
      return;
    }
    const fresh = [];
    for (const run of listing.data) {
      const tr = rowOf(run.id);
      if (!tr) {
        if (data.page === 1) fresh.push(run);
        continue;
      }
      const keepRate = !Sluice.TERMINAL.has(run.status) && last.has(run.id);
      fill(tr, run, keepRate ? undefined : Sluice.averageRate(run));
    }
    for (const run of fresh.reverse()) body.prepend(newRow(run));
  }

  function setLive(state, text) {
    live.dataset.state = state;
    live.textContent = text;
  }

  const query = data.importer ? `?importer=${encodeURIComponent(data.importer)}` : "";
  const source = Sluice.follow(`/api/v1/events${query}`, onEvent, {
    onOpen: () => {
      setLive("live", "live");
      reconcile();
    },
    onError: () => {
      if (source.readyState === EventSource.CLOSED) setLive("offline", "offline");
      else setLive("connecting", "reconnecting");
    },
  });
  window.addEventListener("pagehide", () => source.close());
})();
