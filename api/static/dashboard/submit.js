// The submit form (#/submit, #/submit?clone=<id>): a YAML editor seeded from the API's own examples or a
// job's spec, checked as YAML while typing and by the API on submit; a 422 lists each field with its
// reason and selects the field's line in the editor.

import { api } from "./api.js";
import { esc, flash } from "./util.js";

/** The line (0-based) where a dotted field like "schedule.lr" is written, or its nearest written parent. */
export function lineOf(text, field) {
  const lines = text.split("\n");
  let from = 0;
  let indent = -1;
  let found = -1;
  for (const part of field.split(".").filter(Boolean)) {
    if (/^\d+$/.test(part)) continue; // list index: stay on the list's key
    const key = new RegExp(`^(\\s*)(- )?["']?${part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}["']?\\s*:`);
    let hit = -1;
    for (let i = from; i < lines.length; i++) {
      const m = lines[i].match(key);
      const ind = lines[i].search(/\S/);
      if (found >= 0 && ind >= 0 && ind <= indent && i > found) break; // left the parent's block
      if (m && m[1].length > indent) { hit = i; indent = m[1].length; break; }
    }
    if (hit < 0) break;
    found = hit;
    from = hit + 1;
  }
  return found;
}

function selectLine(textarea, line) {
  const lines = textarea.value.split("\n");
  const start = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0);
  textarea.focus();
  textarea.setSelectionRange(start, start + (lines[line] || "").length);
  const lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 18;
  textarea.scrollTop = Math.max(0, (line - 5) * lineHeight);
}

export function submitView(main, params) {
  const cloneId = params.get("clone");
  main.innerHTML = `
    <h1>${cloneId ? `Clone job ${esc(cloneId)}` : "Submit a job"}</h1>
    <div class="filters"><label>start from <select id="template"><option value="">…</option></select></label>
      <span class="muted">YAML or JSON; unknown keys are rejected.</span></div>
    <div class="two">
      <div><textarea class="editor" id="editor" spellcheck="false" aria-label="job spec"></textarea>
        <div class="actions"><button class="primary" id="submit">Submit</button><span id="yaml-state" class="muted"></span></div></div>
      <div><h2>Problems</h2><div id="errors" class="muted">none found yet</div></div>
    </div>`;
  const $ = (sel) => main.querySelector(sel);
  const editor = $("#editor");
  const examples = {};

  function showErrors(fields) {
    const text = editor.value;
    if (!fields.length) { $("#errors").innerHTML = `<span class="muted">none found yet</span>`; return; }
    $("#errors").className = "";
    $("#errors").innerHTML = `<ul class="field-errors">${fields.map((f, i) => {
      const line = lineOf(text, f.field || "");
      return `<li data-field="${esc(f.field)}"><span class="field" data-i="${i}" data-line="${line}">${esc(f.field || "(spec)")}</span>
        ${line >= 0 ? `<span class="muted">line ${line + 1}</span>` : ""}<br>${esc(f.msg)}</li>`;
    }).join("")}</ul>`;
    for (const el of main.querySelectorAll(".field[data-line]")) {
      el.onclick = () => Number(el.dataset.line) >= 0 && selectLine(editor, Number(el.dataset.line));
    }
    const firstLine = lineOf(text, fields[0].field || "");
    if (firstLine >= 0) selectLine(editor, firstLine);
  }

  function parse() {
    try {
      const spec = jsyaml.load(editor.value);
      if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw new Error("the spec must be a mapping of fields");
      editor.classList.remove("invalid");
      $("#yaml-state").textContent = `valid YAML · kind ${spec.kind ?? "?"}`;
      return spec;
    } catch (err) {
      editor.classList.add("invalid");
      $("#yaml-state").textContent = err.message.split("\n")[0];
      return null;
    }
  }
  editor.addEventListener("input", parse);

  $("#template").onchange = () => {
    const ex = examples[$("#template").value];
    if (ex) { editor.value = jsyaml.dump(ex, { lineWidth: 120 }); parse(); showErrors([]); }
  };

  $("#submit").onclick = async () => {
    if (!parse()) { flash("fix the YAML first"); return; }
    $("#submit").disabled = true;
    try {
      const job = await api.post("/jobs", editor.value, "application/yaml");
      flash(`job ${job.id} submitted (${job.status})`, "ok");
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      showErrors(err.fields.length ? err.fields : [{ field: "", msg: err.message }]);
      flash(err.status === 422 ? `the API refused the spec: ${err.fields.length} problem(s), listed on the right` : err.message);
    } finally {
      $("#submit").disabled = false;
    }
  };

  (async () => {
    const openapi = await api.get("/openapi.json");
    const content = openapi.paths?.["/jobs"]?.post?.requestBody?.content?.["application/json"] || {};
    for (const [key, ex] of Object.entries(content.examples || {})) examples[key] = ex.value;
    $("#template").innerHTML = Object.entries(content.examples || {})
      .map(([key, ex]) => `<option value="${esc(key)}">${esc(ex.summary || key)}</option>`).join("");
    if (cloneId) {
      const job = await api.get(`/jobs/${cloneId}`);
      const spec = { ...job.spec, name: `${job.spec.name}-copy` };
      editor.value = jsyaml.dump(spec, { lineWidth: 120 });
      $("#template").insertAdjacentHTML("afterbegin", `<option value="" selected>job ${esc(cloneId)}</option>`);
    } else {
      editor.value = jsyaml.dump(examples[Object.keys(examples)[0]] || { kind: "train", name: "" }, { lineWidth: 120 });
    }
    parse();
  })().catch((err) => flash(err.message));
  return () => {};
}
