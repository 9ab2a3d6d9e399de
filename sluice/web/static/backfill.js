// Backfill state per DID and collection, from GET /api/v1/backfill.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const { did, status } = Sluice.pageData();
  const STATUS_BADGE = { in_progress: "running", pending: "queued" };

  async function load() {
    const params = new URLSearchParams();
    if (did) params.set("did", did);
    if (status) params.set("status", status);
    let states;
    try {
      states = (await Sluice.api(`/api/v1/backfill?${params}`)).data;
    } catch (error) {
      $("backfill-error").textContent = `Could not load the backfill state: ${error.message}`;
      $("backfill-error").hidden = false;
      return;
    }
    const counts = {};
    for (const s of states) counts[s.status] = (counts[s.status] || 0) + 1;
    const dids = new Set(states.map((s) => s.did));
    $("backfill-summary").textContent = states.length
      ? `${Sluice.num(dids.size)} DID${dids.size === 1 ? "" : "s"} · ` +
        Object.entries(counts).map(([k, v]) => `${Sluice.statusLabel(k)} ${Sluice.num(v)}`).join(" · ")
      : "";
    $("backfill-empty").hidden = states.length > 0;
    $("backfill-body").replaceChildren(
      ...states.map((s) => {
        const badge = Sluice.h("span", { class: "badge", "data-status": STATUS_BADGE[s.status] || s.status });
        badge.textContent = Sluice.statusLabel(s.status);
        return Sluice.h(
          "tr",
          { "data-did": s.did, "data-collection": s.collection },
          Sluice.h("td", { class: "mono", text: s.did }),
          Sluice.h("td", { text: s.collection }),
          Sluice.h("td", {}, badge),
          Sluice.h("td", { class: "num", text: Sluice.num(s.records_synced) }),
          Sluice.h("td", { class: "num wide", text: Sluice.num(s.records_skipped) }),
          Sluice.h("td", { class: "num", text: Sluice.num(s.records_failed) }),
          Sluice.h("td", { class: "num wide", text: Sluice.num(s.pages) }),
          Sluice.h("td", { class: "wide mono", text: s.pds || "—" }),
          Sluice.h("td", {}, s.run_id ? Sluice.h("a", { href: `/ui/runs/${s.run_id}`, text: s.run_id.slice(0, 8) }) : "—"),
          Sluice.h("td", { class: "wide nowrap" }, Sluice.timeElement(s.completed_at)),
          Sluice.h("td", { class: "reason", text: s.error || "" }),
        );
      }),
    );
  }

  load();
})();
