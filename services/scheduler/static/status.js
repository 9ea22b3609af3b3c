// cronclock status page: plain JavaScript, no build step. The admin token lives in this tab's
// sessionStorage and travels only in the Authorization header.
"use strict";

const TOKEN_KEY = "cronclock.adminToken";
const REFRESH_MS = 5000;
const RUNS = 60;  // attempts fetched per job: the strip shows their slots

function $(id) { return document.getElementById(id); }

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, method = "GET") {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": `Bearer ${token()}` },
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  return { status: response.status, body };
}

// -- time ------------------------------------------------------------------------------------

function relative(iso, now = Date.now()) {
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  const size = Math.abs(seconds);
  let text;
  if (size < 60) text = `${size} s`;
  else if (size < 3600) text = `${Math.round(size / 60)} min`;
  else if (size < 86400 * 2) text = `${Math.round(size / 3600)} h`;
  else text = `${Math.round(size / 86400)} days`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

// A next run that has come is "due now" until the next refresh shows the one after it, never
// "1 s ago".
function ahead(iso, now = Date.now()) {
  return Date.parse(iso) <= now ? "due now" : relative(iso, now);
}

function utcText(iso) { return iso.replace("T", " ").replace(/\.\d+Z$/, " UTC"); }

function localText(iso) {
  // 2026-11-23T09:00:00+08:00 -> 2026-11-23 09:00 (+08:00)
  const match = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(.*)$/.exec(iso);
  return match ? `${match[1]} ${match[2]} (${match[3] || "local"})` : iso;
}

// Something that has happened: "12 s ago", "just now" (never "in 0 s" when this browser's
// clock is a little behind the daemon's).
function since(iso, now = Date.now()) {
  return Date.parse(iso) > now - 1000 ? "just now" : relative(iso, now);
}

function updateRelativeTimes() {
  for (const node of document.querySelectorAll("[data-relative]")) {
    node.textContent = relative(node.getAttribute("data-relative"));
  }
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = since(node.getAttribute("data-since"));
  }
  for (const node of document.querySelectorAll("[data-ahead]")) {
    node.textContent = ahead(node.getAttribute("data-ahead"));
  }
}

function ago(iso, className = "relative") {
  return el("span", { className, "data-since": iso, text: since(iso) });
}

// -- runs ------------------------------------------------------------------------------------

const OUTCOMES = {
  success: "success", busy: "busy (409: the application was still working)",
  failed: "failed", skipped_overlap: "skipped: the previous run was still in flight",
  skipped_claimed: "skipped: another replica claimed it", missed: "missed",
  interrupted: "interrupted: the daemon stopped during the call",
};
const FAILED = new Set(["failed", "interrupted"]);

function lateness(run) {
  // Send time minus the slot, for the first attempt of a scheduled slot.
  if (run.attempt !== 1 || run.key.includes("@manual-") || run.backfill) return null;
  return Math.max(0, Date.parse(run.started) - Date.parse(run.slot));
}

function runTitle(run) {
  const late = lateness(run);
  const parts = [
    `slot ${utcText(run.slot)}`,
    run.outcome,
    run.status !== null ? `HTTP ${run.status}` : null,
    run.duration_seconds !== null ? `${Math.round(run.duration_seconds * 1000)} ms` : null,
    late !== null ? `late ${late} ms` : null,
    run.attempt > 1 ? `attempt ${run.attempt}` : null,
    run.count > 1 ? `${run.count} slots` : null,
    run.error,
  ];
  return parts.filter((part) => part).join(" · ");
}

// The runs of one slot (its attempts share the Idempotency-Key), oldest slot first; each slot
// ends as its last attempt ended.
function slots(runs) {
  const byKey = new Map();
  for (const run of [...runs].reverse()) {
    const key = run.backfill ? `${run.key} backfill` : run.key;  // a backfill: its own cell
    if (!byKey.has(key)) byKey.set(key, []);
    byKey.get(key).push(run);
  }
  return [...byKey.values()].map((attempts) => {
    attempts.sort((a, b) => a.attempt - b.attempt);
    return { attempts, last: attempts[attempts.length - 1] };
  });
}

function strip(job) {
  const list = el("ol", { className: "strip",
    "aria-label": `the last slots of ${job.name}, oldest first, retries inside each` });
  for (const slot of slots(job.runs)) {
    const title = slot.attempts.map(runTitle).join("\n");
    const cell = el("li", { className: `outcome-${slot.last.outcome}`, title,
      "data-outcome": slot.last.outcome, "data-attempts": slot.attempts.length },
      el("span", { className: "sr-only", text: title }));
    for (const attempt of slot.attempts.slice(0, -1)) {  // a mark per retried attempt
      cell.append(el("i", { className: `retry outcome-${attempt.outcome}` }));
    }
    list.append(cell);
  }
  if (!job.runs.length) {
    list.append(el("li", { className: "none", title: "no runs yet" },
      el("span", { className: "sr-only", text: "no runs yet" })));
  }
  return list;
}

function legend() {
  const list = el("ul", { id: "legend", className: "legend", "aria-label": "run colours" });
  for (const [outcome, text] of Object.entries(OUTCOMES)) {
    list.append(el("li", {}, el("span", { className: `swatch outcome-${outcome}` }), ` ${text}`));
  }
  list.append(el("li", {}, el("span", { className: "swatch outcome-success" },
    el("i", { className: "retry outcome-failed" })), " a slot that was retried (a mark per retried attempt)"));
  return list;
}

// -- rendering -------------------------------------------------------------------------------

function badge(text, kind) {
  return el("span", { className: `badge ${kind}`, text });
}

function nextRun(job) {
  if (job.paused) {
    const reason = job.pause_reason || "";
    const text = reason.includes("410") ? "disabled" : reason ? "auto-paused" : "paused";
    const cell = el("td", { className: "next" }, badge(text, "badge-paused"));
    if (reason) cell.append(el("span", { className: "reason", text: reason }));
    return cell;
  }
  if (!job.next_run) return el("td", { className: "next", text: job.enabled ? "none planned" : "disabled" });
  return el("td", { className: "next" },
    el("time", { datetime: job.next_run, text: localText(job.next_run_local || job.next_run) }),
    el("span", { className: "utc", text: utcText(job.next_run) }),
    el("span", { className: "relative", "data-ahead": job.next_run, text: ahead(job.next_run) }));
}

function lastRun(job) {
  const cell = el("td", { className: "last" });
  const last = job.last_run;
  if (!last.outcome) {
    cell.append(el("span", { className: "muted", text: "no run yet" }));
  } else {
    cell.append(badge(last.outcome, `outcome-${last.outcome}`));
    if (last.status !== null) cell.append(" ", el("span", { className: "http", text: `HTTP ${last.status}` }));
    if (last.at) cell.append(" ", ago(last.at, "when"));
    const newest = slots(job.runs).at(-1);
    const late = newest ? lateness(newest.attempts[0]) : null;
    if (late !== null) cell.append(el("span", { className: "lateness muted", text: `sent ${late} ms after its slot` }));
  }
  cell.append(el("span", { className: "success-line muted" },
    "last success: ", job.last_success ? ago(job.last_success, "when") : "never"));
  if (job.stale) cell.append(" ", badge("stale", "badge-degraded"));
  if (job.consecutive_failures > 1) {
    const allowance = job.pause_after_failures ? ` of ${job.pause_after_failures} before it pauses` : "";
    cell.append(el("span", { className: "failure", text: `${job.consecutive_failures} failed slots in a row${allowance}` }));
  }
  const failure = job.runs.find((run) => FAILED.has(run.outcome));
  if (failure) {
    const status = failure.status !== null ? `HTTP ${failure.status}` : null;
    const what = failure.error && status && failure.error.startsWith(status) ? failure.error
      : [status, failure.error].filter((part) => part).join(": ");
    cell.append(el("span", { className: "failure" }, "last failure ", ago(failure.started, "when"),
      `: ${what || failure.outcome}`));
  }
  if (job.in_flight) cell.append(el("span", { className: "muted", text: `${job.in_flight} in flight` }));
  return cell;
}

function actions(job) {
  const cell = el("td");
  cell.append(el("button", { type: "button", "data-action": "trigger", "data-job": job.name,
    "aria-label": `Trigger ${job.name} now`, text: "Trigger" }));
  const action = job.paused ? "resume" : "pause";
  cell.append(el("button", { type: "button", "data-action": action, "data-job": job.name,
    "aria-label": `${job.paused ? "Resume" : "Pause"} ${job.name}`, text: job.paused ? "Resume" : "Pause" }));
  return cell;
}

function jobRow(job) {
  return el("tr", { "data-job": job.name },
    el("th", { scope: "row" }, el("button", { type: "button", className: "link", "data-history": job.name,
      "aria-label": `History of ${job.name}`, text: job.name })),
    el("td", { text: job.schedule }),
    el("td", { text: job.timezone }),
    nextRun(job),
    lastRun(job),
    el("td", {}, strip(job)),
    actions(job));
}

function renderHealth(health) {
  const line = $("health");
  line.className = `health health-${health.status}`;
  line.setAttribute("data-status", health.status);
  line.replaceChildren(badge(health.status, `badge-${health.status}`), " ",
    el("span", { id: "health-text", text: describe(health) }));
  const banners = $("banners");
  banners.replaceChildren();
  if (health.status === "unhealthy") {
    banners.append(el("p", { className: "banner banner-error", role: "alert",
      text: `Unhealthy: ${health.reason}` }));
  }
  const target = health.target;
  if (target && target.status === "unreachable") {
    banners.append(el("p", { className: "banner banner-degraded", role: "alert", id: "unreachable" },
      `The application is unreachable since ${localTime(target.since)} (`, ago(target.since, "when"),
      `): the last ${target.consecutive_failures} calls could not connect — ${target.last_error}`));
  }
  if (health.role === "standby") {
    banners.append(el("p", { className: "banner banner-standby",
      text: `This replica is a standby: ${health.leader || "another replica"} leads` +
        (health.fencing_token !== null ? ` (epoch ${health.fencing_token})` : "") +
        ". Triggers go to the leader; pause and resume work here." }));
  }
}

function localTime(iso) { return new Date(Date.parse(iso)).toLocaleString(); }

function describe(health) {
  let text = `${health.replica}: ${health.role}`;
  if (health.role === "standby") text += `; leader ${health.leader || "unknown"}`;
  if (health.reason) text += ` — ${health.reason}`;
  return text;
}

function renderDst(jobs) {
  const affected = jobs.filter((job) => job.dst_effects && job.dst_effects.length);
  $("dst").hidden = !affected.length;
  $("dst-list").replaceChildren(...affected.map((job) => el("li", {},
    el("strong", { text: job.name }), ": ", job.dst_effects.join("; "))));
}

function renderOverview(overview) {
  renderHealth(overview.health);
  $("jobs").tBodies[0].replaceChildren(...overview.jobs.map(jobRow));
  renderDst(overview.jobs);
  const groups = overview.groups.map((group) => el("tr", {},
    el("th", { scope: "row", text: group.group === null ? "(no group)" : group.group }),
    el("td", { text: String(group.active) }),
    el("td", { text: String(group.ended) })));
  if (!groups.length) groups.push(el("tr", {}, el("td", { colspan: 3, className: "muted", text: "No runtime schedules." })));
  $("groups").tBodies[0].replaceChildren(...groups);
  const refreshed = $("refreshed");
  refreshed.setAttribute("datetime", overview.generated);
  refreshed.textContent = new Date(Date.parse(overview.generated)).toLocaleTimeString();
  if (!$("history").hidden) loadHistory();
}

// -- history of one job ----------------------------------------------------------------------

const HISTORY = 200;
let historyJob = null;
let historyRuns = [];

async function openHistory(job) {
  historyJob = job;
  $("history-title").textContent = `History of ${job}`;
  $("history-filter").value = "";
  $("history").hidden = false;
  await loadHistory();
  $("history-filter").focus();
}

async function loadHistory() {
  if (!historyJob) return;
  const result = await api(`/api/jobs/${encodeURIComponent(historyJob)}/runs?limit=${HISTORY}`);
  if (result.status !== 200 || !Array.isArray(result.body)) {
    $("history-message").textContent = `History unavailable (HTTP ${result.status}): ${result.body ? result.body.error : ""}`;
    return;
  }
  $("history-message").textContent = "";
  historyRuns = result.body;
  renderHistory();
}

function renderHistory() {
  const filter = $("history-filter");
  const wanted = filter.value;
  const present = new Set(historyRuns.map((run) => run.outcome));
  filter.replaceChildren(el("option", { value: "", text: `every outcome (${historyRuns.length})` }),
    ...[...present].sort().map((outcome) => el("option", { value: outcome,
      text: `${outcome} (${historyRuns.filter((run) => run.outcome === outcome).length})` })));
  filter.value = present.has(wanted) ? wanted : "";
  const shown = historyRuns.filter((run) => !filter.value || run.outcome === filter.value);
  const rows = shown.map((run) => {
    const late = lateness(run);
    return el("tr", { "data-outcome": run.outcome },
      el("td", { text: utcText(run.slot) }),
      el("td", { text: String(run.attempt) }),
      el("td", {}, badge(run.outcome, `outcome-${run.outcome}`),
        ...(run.backfill ? [" ", badge("backfill", "badge-standby")] : [])),
      el("td", { text: run.status !== null ? String(run.status) : "–" }),
      el("td", { text: run.duration_seconds !== null ? `${Math.round(run.duration_seconds * 1000)} ms` : "–" }),
      el("td", { text: late !== null ? `${late} ms` : "–" }),
      el("td", { className: "error", text: run.error || "" }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, className: "muted", text: "No runs." })));
  $("history-runs").tBodies[0].replaceChildren(...rows);
}

function closeHistory() {
  historyJob = null;
  $("history").hidden = true;
}

function signedIn(yes, message = "") {
  $("login").hidden = yes;
  $("jobs-section").hidden = !yes;
  $("login-message").textContent = message;
}

// -- refresh and actions ---------------------------------------------------------------------

async function refresh() {
  // Health first, without the token: the banners are right even when the jobs cannot be read.
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    renderHealth(await response.json());
  } catch (error) {
    $("banners").replaceChildren(el("p", { className: "banner banner-error", role: "alert",
      text: `The daemon does not answer (${error}); retrying.` }));
  }
  if (!token()) {
    signedIn(false, $("login-message").textContent);
    return;
  }
  let result;
  try {
    result = await api(`/api/overview?runs=${RUNS}`);
  } catch (error) {
    return;
  }
  if (result.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    signedIn(false, "That token was refused. Only health is shown.");
    return;
  }
  if (result.status !== 200 || !result.body) {
    $("message").textContent = `Refresh failed (HTTP ${result.status}): ${result.body ? result.body.error : ""}`;
    return;
  }
  signedIn(true);
  if ($("message").textContent.startsWith("Refresh failed")) $("message").textContent = "";
  renderOverview(result.body);
}

async function act(action, job) {
  const result = await api(`/api/jobs/${encodeURIComponent(job)}/${action}`, "POST");
  const message = $("message");
  if (result.status === 202) message.textContent = `${job}: triggered (Idempotency-Key ${result.body.idempotency_key}).`;
  else if (result.status === 200) message.textContent = `${job}: ${result.body.paused ? "paused" : "resumed"}.`;
  else message.textContent = `${job}: ${action} refused (HTTP ${result.status}): ${result.body ? result.body.error : ""}`;
  await refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = $("token");
    sessionStorage.setItem(TOKEN_KEY, field.value.trim());
    field.value = "";
    $("login-message").textContent = "";
    refresh();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    signedIn(false);
    refresh();
  });
  $("jobs").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) act(button.getAttribute("data-action"), button.getAttribute("data-job"));
    const name = event.target.closest("button[data-history]");
    if (name) openHistory(name.getAttribute("data-history"));
  });
  $("history-filter").addEventListener("change", renderHistory);
  $("history-close").addEventListener("click", closeHistory);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeHistory(); });
  $("legend-slot").replaceWith(legend());
  refresh();
  setInterval(refresh, REFRESH_MS);
  setInterval(updateRelativeTimes, 1000);
});
