// What the frontend logs or requests on a healthy page, by itself, and that the browser checks set
// aside: one definition for tests/browser/*.cjs and scripts/screenshot_workflow.py (which requires
// this file by path), so a new frontend quirk is added in one place.
"use strict";

module.exports = {
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
