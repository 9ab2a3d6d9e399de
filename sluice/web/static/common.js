// Shared helpers of the dashboard's pages: formatting, API calls, lifecycle event names.
"use strict";

const Sluice = (() => {
  // Every type a run's lifecycle can carry. EventSource only hands named events to listeners
  // registered for that name.
  const EVENT_TYPES = [
    "run.started", "run.progress", "run.completed", "run.failed", "run.cancelled",
    "backfill.started", "backfill.progress", "backfill.completed", "backfill.failed",
  ];
  const FINAL_TYPES = new Set(["run.completed", "run.failed", "run.cancelled"]);
  const TERMINAL = new Set(["completed", "completed_with_errors", "failed", "cancelled"]);
  const COUNTERS = [
    "total_rows", "processed_rows", "created_rows", "updated_rows", "unchanged_rows",
    "skipped_rows", "failed_rows", "progress_percent", "items_discovered", "items_completed",
    "items_failed",
  ];

  const numberFormat = new Intl.NumberFormat("en-US");
  const rateFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

  function num(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return Number.isInteger(value) ? numberFormat.format(value) : rateFormat.format(value);
  }

  // Rows per second: whole numbers from 100 up, one decimal below.
  function rate(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return value >= 100 ? numberFormat.format(Math.round(value)) : rateFormat.format(value);
  }

  function pad(n, width = 2) {
    return String(n).padStart(width, "0");
  }

  function time(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // Today: the time of day; before: the date.
  function shortTime(iso) {
    const d = new Date(iso);
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return time(iso).slice(11);
    return time(iso).slice(0, 10);
  }

  function clock(iso) {
    const d = new Date(iso);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
      pad(d.getMilliseconds(), 3);
  }

  function timeElement(iso, { short = false } = {}) {
    if (!iso) return document.createTextNode("—");
    const el = document.createElement("time");
    el.dateTime = iso;
    if (short) el.className = "short";
    el.textContent = short ? shortTime(iso) : time(iso);
    el.title = time(iso);
    return el;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const m = Math.floor(seconds / 60);
    const h = Math.floor(m / 60);
    return h ? `${h} h ${m % 60} min` : `${m} min ${Math.floor(seconds % 60)} s`;
  }

  // Average rows per second of a run since it started (until it finished).
  function averageRate(run) {
    if (!run.started_at || !run.processed_rows) return null;
    const end = run.completed_at ? Date.parse(run.completed_at) : Date.now();
    const seconds = (end - Date.parse(run.started_at)) / 1000;
    return seconds > 0 ? run.processed_rows / seconds : null;
  }

  // A lifecycle event as the run fields it carries.
  function eventToRun(event) {
    return { id: event.run_id, importer: event.importer, status: event.status, ...event.counters };
  }

  // A progress bar and its percentage; indeterminate while a running run has neither a total
  // nor an estimate yet.
  function setProgress(bar, label, run) {
    if (run.status === "running" && run.total_rows === null && !(run.progress_percent > 0)) {
      bar.removeAttribute("value");
      label.textContent = "…";
      return;
    }
    const pct = Math.max(0, Math.min(100, Number(run.progress_percent) || 0));
    bar.value = pct;
    label.textContent = `${Math.floor(pct)}%`;
  }

  function statusLabel(status) {
    return String(status).replace(/_/g, " ");
  }

  function setBadge(badge, status) {
    badge.dataset.status = status;
    badge.textContent = statusLabel(status);
  }

  // The JSON API, with the session cookie. Errors carry the API's message.
  async function api(path, options = {}) {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      ...options,
    });
    if (response.status === 401) {
      window.location.assign(`/ui/login?next=${encodeURIComponent(location.pathname + location.search)}`);
      throw new Error("signed out");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // Follows an SSE URL; `onEvent(event)` gets each lifecycle event (parsed), once per event_id.
  function follow(url, onEvent, { onOpen, onError } = {}) {
    const seen = new Set();
    const source = new EventSource(url, { withCredentials: true });
    const handle = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      if (event.event_id) {
        if (seen.has(event.event_id)) return; // delivered at least once
        seen.add(event.event_id);
        if (seen.size > 5000) seen.clear();
      }
      onEvent(event, message);
    };
    for (const type of EVENT_TYPES) source.addEventListener(type, handle);
    source.onmessage = handle;
    if (onOpen) source.onopen = onOpen;
    if (onError) source.onerror = onError;
    return source;
  }

  function pageData() {
    const el = document.getElementById("page-data");
    return el ? JSON.parse(el.textContent) : {};
  }

  // Times rendered by the server in UTC, shown in the reader's zone.
  function localizeTimes(root = document) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      el.title = time(el.dateTime);
      el.textContent = el.classList.contains("short") ? shortTime(el.dateTime) : time(el.dateTime);
    }
  }

  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  document.addEventListener("DOMContentLoaded", () => localizeTimes());

  return {
    EVENT_TYPES, FINAL_TYPES, TERMINAL, COUNTERS, num, rate, time, clock, timeElement, duration,
    averageRate, eventToRun, setProgress, statusLabel, setBadge, api, follow, pageData, localizeTimes, h,
  };
})();
