// The workbench's only script: it draws what the server returns. Caption rules, runs and generation are the
// project's own Python code behind /api; nothing here edits tags itself.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || data.detail || response.statusText);
  return data;
}

function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.classList.add("shown");
  setTimeout(() => box.classList.remove("shown"), 4000);
}

const fileUrl = (path) => "/file?path=" + encodeURIComponent(path);

async function waitForJob(id, onUpdate) {
  for (;;) {
    const job = await api(`/api/jobs/${id}`);
    if (onUpdate) onUpdate(job);
    if (job.finished) return job;
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
}

// ----------------------------------------------------------------------------- captions page

function captionsPage() {
  const subject = document.body.dataset.subject;
  let rows = [], original = {}, current = {}, tags = {}, history = [];
  const cards = new Map();

  const dirty = () => Object.keys(current).filter((name) => current[name] !== original[name]);
  function refreshButtons() {
    $("#undo").disabled = history.length === 0;
    const changed = dirty().length;
    $("#save").disabled = changed === 0;
    $("#edit-status").textContent = changed ? `${changed} unsaved` : "";
  }

  function showTags(counts) {
    const list = $("#tag-list"), select = $("#filter-tag"), names = $("#tag-names");
    const chosen = select.value;
    list.replaceChildren(); names.replaceChildren();
    select.replaceChildren(el("option", {value: "", textContent: "any"}));
    for (const [tag, count] of Object.entries(counts)) {
      const item = el("li", {}, el("button", {className: "link", textContent: tag, onclick: () => {
        select.value = tag; applyFilter(); }}), el("span", {className: "count", textContent: ` ${count}`}));
      list.append(item);
      select.append(el("option", {value: tag, textContent: `${tag} (${count})`}));
      names.append(el("option", {value: tag}));
    }
    select.value = chosen in counts ? chosen : "";
  }

  function takeTags(data) {
    Object.assign(tags, data.tags);
    showTags(data.tag_counts);
  }

  function setText(name, text) {
    current[name] = text;
    const card = cards.get(name);
    const area = $("textarea", card);
    if (area.value !== text) area.value = text;
    card.classList.toggle("edited", text !== original[name]);
  }

  function visible(row) {
    const tag = $("#filter-tag").value, text = $("#filter-text").value.toLowerCase(), status = $("#filter-status").value;
    return (!tag || (tags[row.file_name] || []).includes(tag)) &&
      (!text || current[row.file_name].toLowerCase().includes(text) || row.file_name.toLowerCase().includes(text)) &&
      (!status || row.status === status);
  }

  function applyFilter() {
    let shown = 0;
    for (const row of rows) {
      const show = visible(row);
      cards.get(row.file_name).hidden = !show;
      shown += show;
    }
    $("#shown-count").textContent = `${shown} of ${rows.length} shown`;
  }

  async function edit(edit, names) {
    const before = Object.fromEntries(names.map((name) => [name, current[name]]));
    const data = await api(`/api/subjects/${subject}/captions/edit`, {...edit, names, captions: current});
    const changed = Object.keys(data.changed);
    if (changed.length) history.push(Object.fromEntries(changed.map((name) => [name, before[name]])));
    for (const [name, text] of Object.entries(data.changed)) setText(name, text);
    takeTags(data);
    applyFilter();
    refreshButtons();
    return changed.length;
  }

  function card(row) {
    const area = el("textarea", {value: row.text, rows: 3, className: "caption", ariaLabel: `caption of ${row.file_name}`});
    area.addEventListener("change", () => edit({op: "set", text: area.value}, [row.file_name]).catch((e) => toast(e.message)));
    const pick = el("input", {type: "checkbox", className: "pick", value: row.file_name, ariaLabel: `select ${row.file_name}`});
    const status = el("span", {className: `badge ${row.status}`, textContent: row.status, title: row.reason});
    const node = el("figure", {className: "card"},
      el("img", {src: `/api/subjects/${subject}/image?name=${encodeURIComponent(row.file_name)}`, loading: "lazy", alt: row.file_name}),
      el("figcaption", {}, pick, el("span", {className: "name", textContent: row.file_name}),
        el("span", {className: `badge ${row.source}`, textContent: row.source}), status,
        row.reason ? el("div", {className: "reason", textContent: row.reason}) : ""),
      area);
    node.dataset.name = row.file_name;
    return node;
  }

  async function load() {
    const data = await api(`/api/subjects/${subject}/captions`);
    rows = data.rows; history = []; cards.clear();
    original = Object.fromEntries(rows.map((row) => [row.file_name, row.text]));
    current = {...original};
    tags = {};
    const grid = $("#grid");
    grid.replaceChildren(...rows.map((row) => { const c = card(row); cards.set(row.file_name, c); return c; }));
    takeTags(data);
    $("#caption-info").textContent = `${rows.length} images · trigger "${data.trigger}" · saved to ${data.reviewed_path}` +
      ` · captions table ${data.version || "not written yet (run captioning)"}`;
    applyFilter();
    refreshButtons();
  }

  function scope() {
    const which = $("#edit-scope").value;
    if (which === "selected") return [...document.querySelectorAll("#grid .pick:checked")].map((box) => box.value);
    if (which === "shown") return rows.filter((row) => !cards.get(row.file_name).hidden).map((row) => row.file_name);
    return rows.map((row) => row.file_name);
  }

  $("#edit-apply").onclick = async () => {
    const names = scope();
    if (!names.length) return toast("Nothing selected");
    try {
      const count = await edit({op: $("#edit-op").value, tag: $("#edit-tag").value, replacement: $("#edit-replacement").value}, names);
      toast(`${count} caption(s) changed`);
    } catch (error) { toast(error.message); }
  };
  $("#undo").onclick = async () => {
    const step = history.pop();
    if (!step) return;
    for (const [name, text] of Object.entries(step)) setText(name, text);
    takeTags(await api(`/api/subjects/${subject}/captions/tags`, {captions: current}));
    applyFilter();
    refreshButtons();
  };
  $("#save").onclick = async () => {
    const edited = Object.fromEntries(dirty().map((name) => [name, current[name]]));
    try {
      const data = await api(`/api/subjects/${subject}/captions/save`, {edited});
      toast(`Saved ${data.saved} caption(s) to ${data.path}`);
      await load();
    } catch (error) { toast(error.message); }
  };
  $("#caption-new").onclick = async () => {
    if (dirty().length && !confirm("Unsaved edits will be reloaded from disk after captioning. Continue?")) return;
    const button = $("#caption-new");
    button.disabled = true;
    try {
      const job = await api(`/api/subjects/${subject}/caption-run`, {});
      const done = await waitForJob(job.id, (j) => { $("#edit-status").textContent = `captioning: ${j.status}`; });
      $("#edit-status").textContent = done.status === "done" ? "captioning done" : `captioning ${done.status}: ${done.error}`;
      await load();
    } catch (error) { toast(error.message); } finally { button.disabled = false; }
  };
  for (const id of ["#filter-tag", "#filter-status"]) $(id).onchange = applyFilter;
  $("#filter-text").oninput = applyFilter;
  load().catch((error) => toast(error.message));
}

// ----------------------------------------------------------------------------- subjects and runs page

function progressText(job) {
  const p = job.progress;
  if (!p) return "";
  if (job.finished && !p.train_total && !p.bar) return job.log_tail.trim().split("\n").pop();  // e.g. "unchanged"
  const parts = [p.node && `node ${p.node}`, p.train_total && `training ${p.train_step}/${p.train_total}`,
    p.bar && !p.bar.startsWith("training ") && `${p.bar} ${p.step}/${p.total}`,
    p.loss && `loss ${p.loss}`, p.speed, p.time_left && job.status === "running" && `${p.time_left} left`];
  return parts.filter(Boolean).join(" · ");
}

function jobNode(job) {
  const actions = el("span");
  if (job.status === "queued") actions.append(el("button", {textContent: "Cancel", onclick: () => api(`/api/jobs/${job.id}/cancel`, {}).then(refreshJobs, (e) => toast(e.message))}));
  if (job.status === "running") actions.append(el("button", {textContent: "Stop", onclick: () => api(`/api/jobs/${job.id}/stop`, {}).then(refreshJobs, (e) => toast(e.message))}));
  const head = el("div", {className: "job-head"}, el("strong", {textContent: job.label}), " ",
    el("span", {className: `badge status-${job.status}`, textContent: job.status}), " ",
    el("span", {className: "progress", textContent: progressText(job)}), " ", actions);
  if (job.mlflow_link) head.append(" ", el("a", {href: job.mlflow_link, textContent: "MLflow run", target: "_blank"}));
  const node = el("div", {className: "job"}, head);
  node.dataset.job = job.id;
  node.dataset.status = job.status;
  if (job.error) node.append(el("pre", {className: "error", textContent: job.error}));
  if (job.samples.length) node.append(el("div", {className: "samples"}, ...job.samples.map((path) =>
    el("img", {src: fileUrl(path), title: path.split("/").pop(), alt: "sample"}))));
  node.append(el("details", {}, el("summary", {textContent: "log"}), el("pre", {className: "log", textContent: job.log_tail})));
  return node;
}

async function refreshJobs() {
  const box = $("#jobs");
  if (!box) return;
  const open = new Set([...box.querySelectorAll("details[open]")].map((d) => d.closest(".job").dataset.job));
  const data = await api("/api/jobs");
  box.replaceChildren(...(data.jobs.length ? data.jobs.map(jobNode) : [el("p", {className: "muted", textContent: "No runs yet."})]));
  for (const node of box.querySelectorAll(".job")) if (open.has(node.dataset.job)) $("details", node).open = true;
}

function subjectsPage() {
  $("#train").onclick = async () => {
    const subjects = [...document.querySelectorAll("#subjects .pick:checked")].map((box) => box.value);
    if (!subjects.length) return toast("Select a subject first");
    try {
      await api("/api/jobs", {subjects, force: $("#force").checked});
      await refreshJobs();
    } catch (error) { toast(error.message); }
  };
  refreshJobs();
  setInterval(() => refreshJobs().catch(() => {}), 1000);
}

// ----------------------------------------------------------------------------- library page

function libraryPage() {
  const prompt = $("#prompt"), suggest = $("#suggest");
  let names = [];
  api("/api/loras").then((data) => { names = data.loras.map((lora) => lora.name); });
  // Autocomplete: after "<lora:" offer the library's names; picking one writes "<lora:NAME:1>".
  prompt.addEventListener("input", () => {
    const before = prompt.value.slice(0, prompt.selectionStart);
    const typed = before.match(/<lora:([^:>]*)$/i);
    suggest.replaceChildren();
    if (!typed) return;
    for (const name of names.filter((n) => n.startsWith(typed[1]))) {
      suggest.append(el("button", {textContent: name, className: "link", onclick: () => {
        const start = before.length - typed[1].length;
        prompt.value = prompt.value.slice(0, start) + `${name}:1>` + prompt.value.slice(prompt.selectionStart);
        suggest.replaceChildren();
        prompt.focus();
      }}));
    }
  });
  $("#generate").onclick = async () => {
    const button = $("#generate");
    button.disabled = true;
    $("#gen-error").textContent = "";
    try {
      const seed = $("#seed").value === "" ? null : Number($("#seed").value);
      const job = await api("/api/generate", {prompt: prompt.value, seed});
      const done = await waitForJob(job.id, (j) => { $("#gen-status").textContent = `${j.status} ${progressText(j)}`; });
      $("#gen-status").textContent = done.status;
      if (done.status !== "done") { $("#gen-error").textContent = done.error; return; }
      const data = await api(`/api/jobs/${job.id}/images`);
      $("#gen-images").replaceChildren(...data.images.map((image) => el("figure", {className: "card generated"},
        el("img", {src: fileUrl(image.path), alt: image.path}), el("pre", {className: "pnginfo", textContent: image.parameters}))));
    } catch (error) { $("#gen-error").textContent = error.message; } finally { button.disabled = false; }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "captions") captionsPage();
  if (page === "subjects") subjectsPage();
  if (page === "library") libraryPage();
});
