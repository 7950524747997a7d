// What the frontend logs or requests on a healthy page, by itself, and that the browser checks set
// aside: one definition for tests/browser/*.cjs and scripts/screenshot_workflow.py (which requires
// this file by path), so a new frontend quirk is added in one place.
"use strict";

const NOISE = {
  // Frontend 1.32.9 writes a setting while it boots, before the setting is defined (its
  // useRenderModeSetting), and logs this; the stack lies wholly in the frontend's own bundles.
  FRONTEND_BOOT_ERROR: /^TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange \([^)]*\/assets\/index-[^)]*\)\n\s+at Proxy\.set [^]*\/assets\/GraphView-/,
  // Optional files the frontend probes for and takes a 404 as "none" (user.css, saved templates, a
  // workflows folder).
  OPTIONAL: /^\/(api\/userdata\/(user\.css|comfy\.templates\.json)|user\.css|api\/userdata|favicon\.ico)$/,
  // Frontends since about 1.50 read the queue and history from `/api/jobs`, which ComfyUI 0.3.75 lacks:
  // their queue and history panels stay empty there (no fallback) and every status message logs these.
  // The pack does not use them, so they are set aside (and counted in the reports).
  JOBS_API: /^\/api\/jobs$/,
  JOBS_API_ERROR: /^(\[Jobs API\] Error fetching jobs|Failed to fetch queue): JobsApiError: Failed to fetch jobs: 404/,
  // Frontend 1.58's panel splitter, about its own saved sizes; not the workflow's.
  FRONTEND_LAYOUT_WARNING: /^WARNING: Invalid layout total size: [\d.]+%\. Layout normalization will be applied\.$/,
  // The browser's own line for a failed request; the checks judge the request by its response.
  FAILED_RESOURCE: /^Failed to load resource/,
};

// The checks the browser tests make on every page, with the noise above set aside: page errors,
// console errors, and failed responses and requests from our own server (`baseUrl`). What is set
// aside goes to report.ignored (the /api/jobs errors are counted in report.jobsApiErrors), console
// warnings to report.console under the driver's current `phase()`.
function watchPage(page, { baseUrl, report, problem, phase }) {
  page.on("pageerror", (err) => problem(`page error: ${err.message}`));
  // The frontend asks the online node registry about every node pack; offline, those fail
  // harmlessly. Only what comes from our own server counts.
  const local = (url) => !url || url.startsWith(baseUrl) || url.startsWith("data:") || url.startsWith("blob:");
  const benign = (url) => !local(url) || NOISE.OPTIONAL.test(new URL(url).pathname);
  page.on("console", (msg) => {
    const text = msg.text();
    const where = msg.location()?.url;
    if (where && benign(where)) { report.ignored.push(`${where}: ${text}`); return; }
    if (msg.type() === "error" && NOISE.FRONTEND_BOOT_ERROR.test(text)) { report.ignored.push(text.split("\n")[0]); return; }
    if (msg.type() === "error" && NOISE.JOBS_API_ERROR.test(text)) { report.jobsApiErrors = (report.jobsApiErrors ?? 0) + 1; return; }
    if (msg.type() === "error" && NOISE.FAILED_RESOURCE.test(text)) { report.ignored.push(`${where}: ${text}`); return; }
    if (msg.type() === "error") problem(`console error: ${text}${where ? ` (${where})` : ""}`);
    else if (msg.type() === "warning") report.console.push(`[${phase()}] ${text}`);
  });
  page.on("response", (res) => {
    if (res.status() === 404 && NOISE.JOBS_API.test(new URL(res.url()).pathname)) return;
    if (res.status() >= 400 && !benign(res.url())) problem(`HTTP ${res.status()} for ${new URL(res.url()).pathname}`);
  });
  page.on("requestfailed", (req) => {
    // A reload aborts the requests of the page it leaves.
    if (!benign(req.url()) && !/ERR_ABORTED/.test(req.failure()?.errorText ?? ""))
      problem(`request failed: ${req.url()} ${req.failure()?.errorText}`);
  });
}

module.exports = { ...NOISE, watchPage };
