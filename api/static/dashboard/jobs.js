// The jobs list: filters, search and sort in the URL (#/?status=running&kind=train&search=r18&sort=priority&page=2), paging,
// a refresh while any listed job is still active, and a selection to compare.

import { api } from "./api.js";
import { esc, fmtDuration, fmtNum, fmtTime, headlineAp, isFinished, progressBar, statusBadge } from "./util.js";

const PAGE = 25;
const STATUSES = ["", "waiting", "queued", "running", "succeeded", "failed", "canceled", "pruned"];
const KINDS = ["", "train", "distill", "evaluate", "study", "sweep", "export"];
const REFRESH_MS = 3000;

export function jobsView(main, params) {
  const state = {
    status: params.get("status") || "", kind: params.get("kind") || "", name: params.get("name") || "",
    search: params.get("search") || "", sort: params.get("sort") || "",
    page: Math.max(1, Number(params.get("page") || 1)),
  };
  const picked = new Set();
  let timer = null;
  let stopped = false;

  main.innerHTML = `
    <h1>Jobs</h1>
    <form class="filters" id="filters">
      <label>status <select name="status">${STATUSES.map((s) => `<option value="${s}">${s || "any"}</option>`).join("")}</select></label>
      <label>kind <select name="kind">${KINDS.map((k) => `<option value="${k}">${k || "any"}</option>`).join("")}</select></label>
      <label>name <input name="name" placeholder="exact name" size="16"></label>
      <label>search <input name="search" type="search" placeholder="name contains, or id" size="22"></label>
      <label>sort <select name="sort"><option value="">newest</option><option value="priority">priority</option></select></label>
      <button type="submit">Apply</button>
      <a class="button" href="#/submit">New job</a>
      <button type="button" id="compare" disabled>Compare selected</button>
    </form>
    <table id="jobs-table">
      <thead><tr><th></th><th class="num">id</th><th>name</th><th>kind</th><th class="num">priority</th><th>status</th><th>progress</th>
        <th class="num">ETA</th><th class="num">AP</th><th>created</th></tr></thead>
      <tbody id="jobs"><tr><td colspan="10" class="muted">Loading…</td></tr></tbody>
    </table>
    <div class="pager"><button id="prev">‹ newer</button><span id="page-info" class="muted"></span>
      <button id="next">older ›</button></div>`;

  const form = main.querySelector("#filters");
  for (const k of ["status", "kind", "name", "search", "sort"]) form.elements[k].value = state[k];
  const go = (page) => {
    const q = new URLSearchParams();
    for (const k of ["status", "kind", "name", "search", "sort"]) if (form.elements[k].value) q.set(k, form.elements[k].value);
    if (page > 1) q.set("page", page);
    location.hash = `#/?${q}`;
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); go(1); });
  form.elements.status.addEventListener("change", () => go(1));
  form.elements.kind.addEventListener("change", () => go(1));
  form.elements.sort.addEventListener("change", () => go(1));
  main.querySelector("#prev").onclick = () => go(state.page - 1);
  main.querySelector("#next").onclick = () => go(state.page + 1);
  const compare = main.querySelector("#compare");
  compare.onclick = () => { location.hash = `#/compare?ids=${[...picked].join(",")}`; };

  async function load() {
    const q = new URLSearchParams({ limit: PAGE, offset: (state.page - 1) * PAGE });
    for (const k of ["status", "kind", "name", "search", "sort"]) if (state[k]) q.set(k, state[k]);
    let data;
    try {
      data = await api.get(`/jobs?${q}`);
    } catch (err) {
      main.querySelector("#jobs").innerHTML = `<tr><td colspan="10" class="error">${esc(err.message)}</td></tr>`;
      return;
    }
    if (stopped) return;
    const rows = data.items.map((j) => `
      <tr data-job="${j.id}">
        <td><input type="checkbox" data-pick="${j.id}" ${picked.has(j.id) ? "checked" : ""} aria-label="compare ${j.id}"></td>
        <td class="num"><a href="#/jobs/${j.id}">${j.id}</a></td>
        <td><a href="#/jobs/${j.id}">${esc(j.name).replaceAll("/", "/<wbr>")}</a>${j.parent_id ? ` <span class="muted">(study ${j.parent_id})</span>` : ""}</td>
        <td>${esc(j.kind)}</td><td class="num">${j.priority ?? 0}</td><td>${statusBadge(j.status)}</td><td>${progressBar(j)}</td>
        <td class="num">${j.status === "running" ? fmtDuration(j.eta_s) : ""}</td>
        <td class="num">${fmtNum(headlineAp(j))}</td><td class="muted">${fmtTime(j.created_at)}</td>
      </tr>`);
    main.querySelector("#jobs").innerHTML = rows.join("") ||
      `<tr><td colspan="10" class="muted">No jobs match. <a href="#/submit">Submit one</a>.</td></tr>`;
    const pages = Math.max(1, Math.ceil(data.total / PAGE));
    main.querySelector("#page-info").textContent = `page ${state.page} of ${pages} · ${data.total} jobs`;
    main.querySelector("#prev").disabled = state.page <= 1;
    main.querySelector("#next").disabled = state.page >= pages;
    for (const box of main.querySelectorAll("[data-pick]")) {
      box.onchange = () => {
        const id = Number(box.dataset.pick);
        box.checked ? picked.add(id) : picked.delete(id);
        compare.disabled = picked.size < 2;
      };
    }
    if (data.items.some((j) => !isFinished(j))) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => { stopped = true; clearTimeout(timer); };
}
