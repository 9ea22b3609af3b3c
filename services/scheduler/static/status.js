// cronclock status page: plain JavaScript, no build step. The admin token lives in this tab's
// sessionStorage and travels only in the Authorization header.
"use strict";

const TOKEN_KEY = "cronclock.adminToken";
const REFRESH_MS = 5000;
const RUNS = 30;

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

function utcText(iso) { return iso.replace("T", " ").replace(/\.\d+Z$/, " UTC"); }

function localText(iso) {
  // 2026-11-23T09:00:00+08:00 -> 2026-11-23 09:00 (+08:00)
  const match = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(.*)$/.exec(iso);
  return match ? `${match[1]} ${match[2]} (${match[3] || "local"})` : iso;
}

function updateRelativeTimes() {
  for (const node of document.querySelectorAll("[data-relative]")) {
    node.textContent = relative(node.getAttribute("data-relative"));
  }
}

// -- rendering -------------------------------------------------------------------------------

function badge(text, kind) {
  return el("span", { className: `badge ${kind}`, text });
}

function runTitle(run) {
  const lateness = run.attempt > 0 ? (Date.parse(run.started) - Date.parse(run.slot)) : null;
  const parts = [
    `slot ${utcText(run.slot)}`,
    run.outcome,
    run.status !== null ? `HTTP ${run.status}` : null,
    run.duration_seconds !== null ? `${Math.round(run.duration_seconds * 1000)} ms` : null,
    lateness !== null && !run.key.includes("@manual-") ? `late ${Math.max(0, lateness)} ms` : null,
    run.attempt > 1 ? `attempt ${run.attempt}` : null,
    run.error,
  ];
  return parts.filter((part) => part).join(" · ");
}

function strip(job) {
  const list = el("ol", { className: "strip", "aria-label": `last ${RUNS} runs of ${job.name}, oldest first` });
  for (const run of [...job.runs].reverse()) {
    const title = runTitle(run);
    list.append(el("li", { className: `outcome-${run.outcome}`, title, "data-outcome": run.outcome },
      el("span", { className: "sr-only", text: title })));
  }
  if (!job.runs.length) {
    list.append(el("li", { className: "none", title: "no runs yet" },
      el("span", { className: "sr-only", text: "no runs yet" })));
  }
  return list;
}

function nextRun(job) {
  if (!job.next_run) return el("td", { text: job.enabled ? "none planned" : "disabled" });
  return el("td", {},
    el("time", { datetime: job.next_run, text: localText(job.next_run_local || job.next_run) }),
    el("span", { className: "utc", text: utcText(job.next_run) }),
    el("span", { className: "relative", "data-relative": job.next_run, text: relative(job.next_run) }));
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
  const last = job.last_run.outcome;
  const outcome = el("td", {}, last ? badge(last, `outcome-${last}`) : el("span", { className: "muted", text: "no run yet" }));
  if (job.paused) outcome.append(" ", badge("paused", "badge-paused"));
  if (job.in_flight) outcome.append(el("span", { className: "muted", text: `${job.in_flight} in flight` }));
  return el("tr", { "data-job": job.name },
    el("th", { scope: "row", text: job.name }),
    el("td", { text: job.schedule }),
    el("td", { text: job.timezone }),
    nextRun(job),
    outcome,
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
  if (health.role === "standby") {
    banners.append(el("p", { className: "banner banner-standby",
      text: `This replica is a standby: ${health.leader || "another replica"} leads` +
        (health.fencing_token !== null ? ` (epoch ${health.fencing_token})` : "") +
        ". Triggers go to the leader; pause and resume work here." }));
  }
}

function describe(health) {
  let text = `${health.replica}: ${health.role}`;
  if (health.role === "standby") text += `; leader ${health.leader || "unknown"}`;
  if (health.reason) text += ` — ${health.reason}`;
  return text;
}

function renderOverview(overview) {
  renderHealth(overview.health);
  const banners = $("banners");
  for (const job of overview.jobs) {
    if (job.dst_warning) {
      banners.append(el("p", { className: "banner banner-dst", text: `DST ahead for ${job.name}: ${job.dst_warning}` }));
    }
  }
  $("jobs").tBodies[0].replaceChildren(...overview.jobs.map(jobRow));
  const groups = overview.groups.map((group) => el("tr", {},
    el("th", { scope: "row", text: group.group === null ? "(no group)" : group.group }),
    el("td", { text: String(group.active) }),
    el("td", { text: String(group.ended) })));
  if (!groups.length) groups.push(el("tr", {}, el("td", { colspan: 3, className: "muted", text: "No runtime schedules." })));
  $("groups").tBodies[0].replaceChildren(...groups);
  const refreshed = $("refreshed");
  refreshed.setAttribute("datetime", overview.generated);
  refreshed.textContent = new Date(Date.parse(overview.generated)).toLocaleTimeString();
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
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
  setInterval(updateRelativeTimes, 1000);
});
