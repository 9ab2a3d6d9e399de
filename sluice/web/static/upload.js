// Upload: the file goes to POST /api/v1/imports/{slug}/upload (or, without an importer, to
// /api/v1/imports/adhoc/upload with the table and key), then the new run's page opens.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form");
  const bar = $("upload-progress");
  const { max_bytes: maxBytes } = Sluice.pageData();

  const list = (text) => text.split(",").map((part) => part.trim()).filter(Boolean);
  const adhoc = () => $("importer").value === "adhoc";
  const showAdhoc = () => {
    $("adhoc-fields").hidden = !adhoc();
  };
  $("importer").addEventListener("change", showAdhoc);
  showAdhoc();

  function fail(text) {
    $("upload-error").textContent = text;
    $("upload-error").hidden = false;
    $("upload-submit").disabled = false;
    bar.hidden = true;
  }

  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    const file = $("file").files[0];
    if (!file) return fail("Choose a file to import.");
    if (file.size > maxBytes) {
      return fail(`The file is ${Sluice.num(file.size)} bytes; the limit is ${Sluice.num(maxBytes)} bytes (SLUICE_API_MAX_UPLOAD_BYTES).`);
    }
    const body = new FormData();
    body.append("file", file, file.name);
    body.append("dry_run", $("dry-run").checked ? "true" : "false");
    body.append("fresh", $("fresh").checked ? "true" : "false");
    body.append("decimal_comma", $("decimal-comma").checked ? "true" : "false");
    for (const format of list($("date-format").value)) body.append("date_format", format);
    if (adhoc()) {
      if (!$("table").value.trim() || !list($("key").value).length) {
        return fail("An import without an importer needs the table and its key column(s).");
      }
      body.append("table", $("table").value.trim());
      body.append("key", $("key").value);
      body.append("schema", $("schema").value.trim() || "public");
      body.append("evolve", $("evolve").checked ? "true" : "false");
      for (const marker of list($("null-markers").value)) body.append("null_marker", marker);
    }
    $("upload-error").hidden = true;
    $("upload-submit").disabled = true;
    bar.hidden = false;
    bar.value = 0;

    // XMLHttpRequest rather than fetch: it reports upload progress.
    const request = new XMLHttpRequest();
    const slug = adhoc() ? "adhoc" : encodeURIComponent($("importer").value);
    request.open("POST", `/api/v1/imports/${slug}/upload`);
    request.withCredentials = true;
    request.setRequestHeader("Accept", "application/json");
    request.upload.onprogress = (progress) => {
      if (progress.lengthComputable) bar.value = (100 * progress.loaded) / progress.total;
    };
    request.onerror = () => fail("The upload did not reach the server; try again.");
    request.onload = () => {
      let answer = null;
      try {
        answer = JSON.parse(request.responseText);
      } catch (_) {
        // not JSON: reported below
      }
      if (request.status === 401) {
        window.location.assign("/ui/login?next=/ui/upload");
      } else if (request.status >= 200 && request.status < 300 && answer && answer.id) {
        window.location.assign(`/ui/runs/${answer.id}`);
      } else {
        fail(answer && answer.error ? answer.error.message : `Upload failed (HTTP ${request.status}).`);
      }
    };
    request.send(body);
  });
})();
