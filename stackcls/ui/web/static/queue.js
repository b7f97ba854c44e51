// The queue: rebuilt from /api/queue; every value goes into the page as text, never as HTML.
"use strict";
const boot = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);
let last = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
const rng = (r) => (r ? `${r[0]}..${r[1]}` : "—");
const pct = (x) => `${Math.round(100 * x)} %`;

function keep(row) {
  const s = $("f-status").value, f = $("f-flag").value;
  if (s !== "any" && row.status !== s) return false;
  if (f === "flagged" && !row.flags.length) return false;
  if (f === "none" && row.flags.length) return false;
  if (f !== "any" && f !== "flagged" && f !== "none" && !row.flags.includes(f)) return false;
  return true;
}

function draw(q) {
  last = q;
  const p = q.progress;
  $("progress-bar").style.width = `${p.total ? (100 * p.done) / p.total : 100}%`;
  const what = { loading: "loading the model…", running: "predicting", done: "predicted",
                 none: "no model: labelling only", failed: `model failed: ${p.error}` }[p.model] || p.model;
  $("progress-text").textContent = `${what} · ${p.done} / ${p.total} stacks`;
  $("progress-box").dataset.state = p.model;
  const e = q.effort;
  $("effort").hidden = !e;
  if (e) {
    $("effort-text").textContent =
      `To reach ${pct(e.target)} exactly right ranges on the ${e.n} labelled stacks, check ` +
      `${pct(e.model)} of them in this order (least sure first), against ${pct(e.trivial)} ` +
      `for "every slice IN" checked in random order. Right before any check: model ` +
      `${pct(e.p_model)}, every slice IN ${pct(e.p_trivial)}.`;
  }
  const body = document.querySelector("#queue tbody");
  const rows = q.rows.filter(keep);
  body.replaceChildren(...rows.map((r, i) => {
    const tr = el("tr", null, `st-${r.status}`);
    tr.dataset.sid = r.sid;
    const a = el("a", r.subject);
    a.href = `/stack/${r.sid}`;
    const name = el("td"); name.appendChild(a);
    const cov = r.error ? `error: ${r.error}` : (r.coverage || "—");
    tr.append(el("td", i + 1), name, el("td", r.phase), el("td", r.slices),
      el("td", r.range_probability === null ? "…" : r.range_probability.toFixed(3), "num"),
      el("td", cov, r.flags.length || r.error ? "flag" : ""), el("td", rng(r.model_range)),
      el("td", r.label_range ? rng(r.label_range) : (r.labelled ? `${r.labelled} slices` : "—")),
      el("td", r.status, "badge"));
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.href = a.href; });
    return tr;
  }));
  $("count").textContent = `${rows.length} of ${q.rows.length} stacks`;
  document.body.dataset.ready = p.model === "loading" || p.model === "running" ? "partial" : "done";
}

async function poll() {
  try {
    const r = await fetch("/api/queue", { cache: "no-store" });
    if (r.ok) draw(await r.json());
  } catch (err) { $("progress-text").textContent = "server unreachable"; }
  const busy = !last || ["loading", "running"].includes(last.progress.model);
  setTimeout(poll, busy ? 700 : 5000);
}

function filtersToUrl() {
  const u = new URL(location.href);
  u.searchParams.delete("token");
  u.searchParams.set("status", $("f-status").value);
  u.searchParams.set("flag", $("f-flag").value);
  history.replaceState(null, "", u);
  if (last) draw(last);
}

$("f-status").value = boot.filters.status;
$("f-flag").value = boot.filters.flag;
$("f-status").addEventListener("change", filtersToUrl);
$("f-flag").addEventListener("change", filtersToUrl);
poll();
