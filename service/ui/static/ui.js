// Mergeline dashboard. Every view reads the same JSON API as any client, with the token kept in this tab's
// sessionStorage and sent as the Bearer header; data is put into the page with textContent only, never as HTML.
"use strict";

const TOKEN_KEY = "mergeline.token";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#8a6d00", "#56b4e9", "#7b3294", "#525252"];
const POLL_MS = 500;

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.type = error.type;
    this.param = error.param;
  }
}

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- the API ---------------------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let error = { type: `http_${response.status}`, message: response.statusText || "request failed", param: null };
    try {
      error = (await response.json()).error || error;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, error);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

async function listAll(path) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await apiJson(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = page.data[page.data.length - 1].name;
  }
}

// -- messages ---------------------------------------------------------------------------------------------------
function showAlert(...content) {
  const box = $("#alert");
  box.replaceChildren(...content);
  box.hidden = false;
}

function showError(err) {
  if (err instanceof ApiError && err.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showAlert(el("strong", {}, "Your API token was not accepted"), ` (${err.message}). `,
      el("a", { href: signinHref() }, "Sign in again"), ".");
  } else if (err instanceof ApiError && err.status === 404) {
    showAlert(el("strong", {}, "Not found: "), `${err.message}. Only your tenant's jobs and lineages are shown.`);
  } else if (err instanceof ApiError) {
    showAlert(el("strong", {}, `${err.type}: `), err.message, err.param ? ` (field: ${err.param})` : "");
  } else {
    showAlert(el("strong", {}, "The API could not be reached: "), String(err.message || err));
  }
}

const signinHref = () => `/ui/signin?next=${encodeURIComponent(location.pathname + location.search)}`;

// -- formatting -------------------------------------------------------------------------------------------------
const when = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/Z$|\+00:00$/, " UTC") : "–");
const pct = (x) => (typeof x === "number" ? `${(x * 100).toFixed(1)}%` : "–");
const bytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} kB` : `${(n / 1048576).toFixed(1)} MB`);
const duration = (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
const badge = (status) => el("span", { class: `badge ${status}` }, status);

function facts(dl, pairs) {
  dl.replaceChildren(...pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// One loss per objective where the method alternates several (OTMF: pre, post), else the latest loss.
function lossText(p) {
  if (p.losses && Object.keys(p.losses).length) {
    return Object.entries(p.losses).map(([name, value]) => `${name} ${value.toPrecision(4)}`).join("  ");
  }
  return typeof p.loss === "number" ? `loss ${p.loss.toPrecision(4)}` : null;
}

function progressText(p) {
  if (!p) return "–";
  return `task ${p.task_index + 1}/${p.tasks_total} · step ${p.step}/${p.steps_total}`;
}

// -- sign in ----------------------------------------------------------------------------------------------------
function safeNext() {
  const next = new URLSearchParams(location.search).get("next") || "/ui";
  return next.startsWith("/ui") && !next.startsWith("//") ? next : "/ui";
}

function signinPage() {
  if (new URLSearchParams(location.search).has("next")) {
    showAlert(el("strong", {}, "Sign in to see this page."), " The dashboard needs an API token.");
  }
  $("#signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = $("#token").value.trim();
    try {
      const response = await fetch("/v1/lineages?limit=1", { headers: { Authorization: `Bearer ${candidate}` } });
      if (response.status === 401) {
        showAlert(el("strong", {}, "That token was not accepted."), " Check it and try again.");
        $("#token").focus();
        return;
      }
      if (!response.ok) throw new ApiError(response.status, (await response.json()).error);
      sessionStorage.setItem(TOKEN_KEY, candidate);
      location.assign(safeNext());
    } catch (err) {
      showError(err);
    }
  });
}

// -- lineages ---------------------------------------------------------------------------------------------------
function lineageTasks(lineage) {
  const names = new Set();
  for (const v of lineage.versions) for (const t of v.tasks || []) names.add(t.name);
  return [...names];
}

async function lineagesPage() {
  const lineages = await listAll("/v1/lineages");
  const body = $("#lineages tbody");
  const rows = lineages.map((lineage) => {
    const head = lineage.versions[lineage.versions.length - 1] || {};
    const tasks = lineageTasks(lineage);
    const row = el("tr", {},
      el("td", {}, el("a", { href: `/ui/lineages/${encodeURIComponent(lineage.name)}` }, lineage.name)),
      el("td", { class: "num" }, `v${lineage.head}`),
      el("td", {}, tasks.join(", ") || "–"),
      el("td", { class: "num" }, pct((head.metrics || {}).avg_accuracy)),
      el("td", {}, when(head.created_at || lineage.created_at)));
    row.dataset.search = `${lineage.name} ${tasks.join(" ")}`.toLowerCase();
    return row;
  });
  body.replaceChildren(...rows);
  const empty = $("#empty");
  const filter = () => {
    const q = $("#search").value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      row.hidden = !row.dataset.search.includes(q);
      shown += row.hidden ? 0 : 1;
    }
    $("#lineages").hidden = shown === 0;
    empty.hidden = shown > 0;
    empty.textContent = lineages.length === 0
      ? "No lineages yet: submit a job to start one."
      : `No lineage matches “${q}”.`;
  };
  $("#search").addEventListener("input", filter);
  filter();
}

// -- one lineage ------------------------------------------------------------------------------------------------
function accuracySeries(versions) {
  const tasks = [];
  for (const v of versions) {
    for (const name of Object.keys((v.metrics || {}).tasks || {})) if (!tasks.includes(name)) tasks.push(name);
  }
  const series = tasks.map((name) => ({
    name, values: versions.map((v) => (((v.metrics || {}).tasks || {})[name] || {}).accuracy ?? null),
  }));
  series.push({ name: "average", average: true, values: versions.map((v) => (v.metrics || {}).avg_accuracy ?? null) });
  return series;
}

function lineChart(labels, series) {
  const W = 720, H = 320, left = 52, right = 16, top = 16, bottom = 40;
  const x = (i) => (labels.length === 1 ? (left + W - right) / 2 : left + (i * (W - left - right)) / (labels.length - 1));
  const y = (v) => top + (1 - v) * (H - top - bottom);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "chart-svg-title" },
    el("svg:title", { id: "chart-svg-title" },
      `Accuracy of ${series.length - 1} task(s) and their average across ${labels.length} version(s)`));
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(el("svg:line", { class: "grid", x1: left, x2: W - right, y1: y(tick), y2: y(tick) }),
      el("svg:text", { x: left - 8, y: y(tick) + 4, "text-anchor": "end" }, `${tick * 100}%`));
  }
  svg.append(el("svg:line", { class: "axis", x1: left, x2: W - right, y1: y(0), y2: y(0) }),
    el("svg:line", { class: "axis", x1: left, x2: left, y1: top, y2: y(0) }));
  labels.forEach((label, i) => svg.append(el("svg:text", { x: x(i), y: H - bottom + 20, "text-anchor": "middle" }, label)));
  series.forEach((s, k) => {
    const colour = s.average ? "#111827" : COLOURS[k % COLOURS.length];
    let d = "";
    let pen = "M";
    s.values.forEach((v, i) => {
      if (v === null) { pen = "M"; return; }
      d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    });
    const group = el("svg:g", { class: s.average ? "series avg" : "series", "data-series": s.name });
    if (d) group.append(el("svg:path", { d, fill: "none", stroke: colour, "stroke-width": 2.5, class: s.average ? "avg" : null }));
    s.values.forEach((v, i) => {
      if (v === null) return;
      group.append(el("svg:circle", { cx: x(i), cy: y(v), r: s.average ? 5 : 4, fill: colour },
        el("svg:title", {}, `${s.name}, ${labels[i]}: ${pct(v)}`)));
    });
    svg.append(group);
  });
  const legend = el("ul", { class: "legend" }, series.map((s, k) =>
    el("li", {}, el("i", { style: null, "data-colour": s.average ? "#111827" : COLOURS[k % COLOURS.length] }), s.name)));
  for (const swatch of legend.querySelectorAll("i")) swatch.style.background = swatch.dataset.colour;
  return [svg, legend];
}

function accuracyTable(table, labels, series) {
  table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col" }, "Task"),
    labels.map((l) => el("th", { scope: "col", class: "num" }, l))));
  table.tBodies[0].replaceChildren(...series.map((s) => el("tr", { "data-series": s.name },
    el("th", { scope: "row" }, s.name), s.values.map((v) => el("td", { class: "num" }, pct(v))))));
}

async function download(name, version, file, button) {
  button.disabled = true;
  try {
    const path = file.path.split("/").map(encodeURIComponent).join("/");
    const response = await api(`/v1/lineages/${encodeURIComponent(name)}/versions/${version}/files/${path}`);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: file.path.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function versionItem(name, v) {
  const inputs = el("details", { class: "inputs" }, el("summary", {}, "Inputs and their sha256"));
  inputs.addEventListener("toggle", () => {
    if (!inputs.open || inputs.querySelector("dl")) return;
    const dl = el("dl", { class: "facts mono" });
    facts(dl, [[`base`, `${(v.base || {}).uri || "–"}\n${(v.base || {}).sha256 || ""}`],
      ...(v.tasks || []).map((t) => [t.name, `${t.checkpoint || t.uri || "–"}\nsha256 ${t.sha256 || "–"}`])]);
    for (const dd of dl.querySelectorAll("dd")) dd.style.whiteSpace = "pre-wrap";
    inputs.append(dl);
  }, { once: false });
  const manifest = el("details", { class: "manifest" }, el("summary", {}, "Manifest"));
  manifest.addEventListener("toggle", async () => {
    if (!manifest.open || manifest.querySelector("pre")) return;
    try {
      const doc = await apiJson(`/v1/lineages/${encodeURIComponent(name)}/versions/${v.version}`);
      manifest.append(el("pre", { tabindex: "0" }, JSON.stringify(doc, null, 2)));
    } catch (err) {
      showError(err);
    }
  });
  const files = el("div", { class: "files" }, (v.files || []).map((file) => {
    const button = el("button", { type: "button", class: "secondary", "data-file": file.path },
      `Download ${file.path} (${bytes(file.bytes)})`);
    button.addEventListener("click", () => download(name, v.version, file, button));
    return button;
  }));
  const dl = el("dl", { class: "facts" });
  facts(dl, [
    ["parent", v.parent ? `v${v.parent}` : "the base"],
    ["created", when(v.created_at)],
    ["job", v.job_id ? el("a", { href: `/ui/jobs/${encodeURIComponent(v.job_id)}` }, v.job_id) : null],
    ["tasks merged", (v.tasks || []).map((t) => t.name).join(", ")],
    ["params", el("code", {}, JSON.stringify(v.params || {}))],
    ["average accuracy", pct((v.metrics || {}).avg_accuracy)],
    ["rollback of", v.rollback_of ? `v${v.rollback_of}` : null],
    ["forked from", v.forked_from ? `${v.forked_from.lineage}@${v.forked_from.version}` : null],
  ]);
  return el("li", { "data-version": v.version },
    el("h3", {}, `v${v.version} `, el("span", { class: "badge" }, v.method || "–")), dl, inputs, manifest, files);
}

async function lineagePage() {
  const name = document.body.dataset.lineage;
  const lineage = await apiJson(`/v1/lineages/${encodeURIComponent(name)}`);
  const base = lineage.base || {};
  facts($("#facts"), [["head", `v${lineage.head}`], ["base", `${base.family || ""} ${typeof base.arch === "string" ? base.arch : "(inline config)"}`],
    ["base uri", base.uri], ["created", when(lineage.created_at)]]);
  const labels = lineage.versions.map((v) => `v${v.version}`);
  const series = accuracySeries(lineage.versions);
  if (series.some((s) => s.values.some((v) => v !== null))) {
    $("#chart").replaceChildren(...lineChart(labels, series));
  } else {
    $("#chart").replaceChildren(el("p", { class: "muted" }, "No version has accuracy yet (tasks without eval sets)."));
  }
  accuracyTable($("#accuracy"), labels, series);
  $("#versions").replaceChildren(...lineage.versions.slice().reverse().map((v) => versionItem(name, v)));
  $("#lineage").hidden = false;
}

// -- jobs -------------------------------------------------------------------------------------------------------
async function jobsPage() {
  const params = new URLSearchParams(location.search);
  const status = params.get("status") || "";
  for (const link of document.querySelectorAll(".filters a")) {
    if (link.dataset.status === status) link.setAttribute("aria-current", "true");
  }
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  if (params.get("lineage")) query.set("lineage", params.get("lineage"));
  const body = $("#jobs tbody");
  let after = null;
  const load = async () => {
    const page = await apiJson(`/v1/jobs?${query}&limit=50${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    body.append(...page.data.map((job) => el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
      el("td", {}, el("a", { href: `/ui/lineages/${encodeURIComponent(job.lineage)}` }, job.lineage)),
      el("td", {}, badge(job.status)), el("td", {}, job.method),
      el("td", {}, progressText(job.progress)), el("td", {}, when(job.created_at)))));
    after = page.data.length ? page.data[page.data.length - 1].id : after;
    $("#more").hidden = !page.has_more;
    $("#jobs").hidden = body.children.length === 0;
    $("#empty").hidden = body.children.length > 0;
    $("#empty").textContent = status ? `No ${status} jobs.` : "No jobs yet.";
  };
  $("#more").addEventListener("click", () => load().catch(showError));
  await load();
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function readEvents(path, onEvent) {
  const response = await api(path, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const fields = { event: "message", data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const key = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (key === "data") fields.data.push(val);
        else fields[key] = val;
      }
      if (fields.data.length) onEvent(fields.event, JSON.parse(fields.data.join("\n")));
    }
  }
}

function eventItem(event) {
  const data = event.data && Object.keys(event.data).length ? ` ${JSON.stringify(event.data)}` : "";
  return el("li", { "data-type": event.type }, el("time", {}, when(event.at)), el("b", {}, event.type), event.message,
    data ? el("span", { class: "muted mono" }, data) : null);
}

class JobView {
  constructor(id) {
    this.id = id;
    this.path = `/v1/jobs/${encodeURIComponent(id)}`;
    this.samples = [];
    this.task = null;
    this.final = false;
  }

  render(job) {
    this.final = FINAL.has(job.status);
    $("#status").replaceWith(Object.assign(badge(job.status), { id: "status" }));
    $("#cancel").hidden = this.final;
    const result = job.result;
    facts($("#facts"), [["lineage", el("a", { href: `/ui/lineages/${encodeURIComponent(job.lineage)}` }, job.lineage)],
      ["method", job.method], ["created", when(job.created_at)], ["started", job.started_at ? when(job.started_at) : null],
      ["finished", job.finished_at ? when(job.finished_at) : null],
      ["version", result ? el("a", { href: `/ui/lineages/${encodeURIComponent(job.lineage)}#v${result.version}` }, `v${result.version}`) : null],
      ["average accuracy", result ? pct((result.metrics || {}).avg_accuracy) : null]]);
    this.renderProgress(job);
    $("#error-box").hidden = !job.error;
    if (job.error) {
      facts($("#error"), [["type", job.error.type], ["message", job.error.message],
        ["failing field", job.error.param || null]]);
    }
  }

  renderProgress(job) {
    const p = job.progress;
    $("#progress-box").hidden = !p && this.final;
    if (!p) {
      $("#progress-text").textContent = job.status === "queued" ? "Queued: waiting for a worker." : "No step taken.";
      return;
    }
    $("#progress").max = p.tasks_total;
    $("#progress").value = p.task_index + p.step / p.steps_total;
    $("#progress-text").textContent = [progressText(p),
      lossText(p),
      this.final ? null : `ETA ${this.eta(p)}`].filter(Boolean).join(" · ");
    $("#progress-text").dataset.step = String(p.step);
  }

  // The step rate within the current task (tasks may differ in length; the first OTMF task is a copy), applied
  // to the steps left in this task and, at the same length, in the tasks after it.
  eta(p) {
    const task = `${p.task_index}/${p.steps_total}`;
    if (this.task !== task) {
      this.task = task;
      this.samples = [];
    }
    const now = performance.now() / 1000;
    const last = this.samples[this.samples.length - 1];
    if (!last || last.step !== p.step) this.samples.push({ now, step: p.step });
    const first = this.samples[0];
    const newest = this.samples[this.samples.length - 1];
    if (newest.step <= first.step) return "–";
    const rate = (newest.step - first.step) / (newest.now - first.now);
    const left = p.steps_total - p.step + (p.tasks_total - p.task_index - 1) * p.steps_total;
    return duration(left / rate);
  }

  async refresh() {
    this.render(await apiJson(this.path));
  }

  async follow() {
    $("#live").textContent = "(live)";
    const poll = setInterval(() => this.refresh().catch(() => {}), POLL_MS);
    try {
      await readEvents(`${this.path}/events`, (type, event) => {
        if (type === "error") throw new ApiError(404, event.error);
        $("#events").append(eventItem(event));
      });
    } finally {
      clearInterval(poll);
      $("#live").textContent = "";
      await this.refresh();
    }
  }

  async cancel(button) {
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      this.render(await apiJson(`${this.path}/cancel`, { method: "POST" }));
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
      button.textContent = "Cancel job";
    }
  }
}

async function jobPage() {
  const view = new JobView(document.body.dataset.job);
  await view.refresh();
  $("#job").hidden = false;
  $("#cancel").addEventListener("click", (e) => view.cancel(e.currentTarget));
  if (view.final) {
    const { data } = await apiJson(`${view.path}/events`);
    $("#events").replaceChildren(...data.map(eventItem));
  } else {
    await view.follow();
  }
}

// -- submit -----------------------------------------------------------------------------------------------------
function submitPage() {
  $("#spec-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) $("#spec").value = await file.text();
  });
  $("#submit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const headers = { "Content-Type": "application/json" };
    const key = $("#idempotency").value.trim();
    if (key) headers["Idempotency-Key"] = key;
    $("#submit-error").hidden = true;
    try {
      const job = await apiJson("/v1/jobs", { method: "POST", headers, body: $("#spec").value });
      location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 401) {
        showError(err);
        return;
      }
      facts($("#submit-error-facts"), [["status", String(err.status)], ["type", err.type], ["message", err.message],
        ["field", err.param || null]]);
      $("#submit-error").hidden = false;
      $("#submit-error").focus();
    }
  });
}

// -- start ------------------------------------------------------------------------------------------------------
const PAGES = { lineages: () => (document.body.dataset.lineage ? lineagePage() : lineagesPage()),
  jobs: () => (document.body.dataset.job ? jobPage() : jobsPage()), submit: submitPage };

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "signin") {
    signinPage();
    return;
  }
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    location.replace(signinHref());
    return;
  }
  const signout = $("#signout");
  signout.hidden = false;
  signout.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.assign("/ui/signin");
  });
  Promise.resolve().then(PAGES[page]).catch(showError);
});
