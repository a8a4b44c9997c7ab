// The dashboard's router: the URL hash names the view, so every page has its own address and survives a
// reload (#/ jobs, #/jobs/<id>, #/compare?ids=..., #/submit). Each view returns a function that stops it.

import { token } from "./api.js";
import { compareView } from "./compare.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { submitView } from "./submit.js";

let stopView = () => {};

function route() {
  const [path, query = ""] = (location.hash.replace(/^#/, "") || "/").split("?");
  const params = new URLSearchParams(query);
  const main = document.getElementById("view");
  stopView();
  document.getElementById("flash").replaceChildren();
  const job = path.match(/^\/jobs\/(\d+)$/);
  let nav = "jobs";
  if (job) stopView = jobView(main, Number(job[1]));
  else if (path === "/compare") { nav = "compare"; stopView = compareView(main, params); }
  else if (path === "/submit") { nav = "submit"; stopView = submitView(main, params); }
  else { document.title = "ICD jobs"; stopView = jobsView(main, params); }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
}

const input = document.getElementById("token");
input.value = token.get();
input.addEventListener("change", () => token.set(input.value.trim()));
window.addEventListener("hashchange", route);
route();
