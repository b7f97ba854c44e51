// The stack page: slices apex -> base, labels as two boundaries, every change saved at once.
// Values from files reach the page through textContent only; the server escapes the rest.
"use strict";
const D = JSON.parse(document.getElementById("boot").textContent);
const TOKEN = document.querySelector('meta[name="stackcls-token"]').content;
const $ = (id) => document.getElementById(id);
const N = D.n;
let labels = D.labels.slice();
let selected = 0;
const undo = [];
let chain = Promise.resolve();   // saves go one after another, in the order they were made
let pending = 0;
let drag = null;
let cine = null;
const cards = [];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const inRange = (ls) => {
  const f = ls.indexOf("IN"), l = ls.lastIndexOf("IN");
  return f < 0 ? null : [f, l];
};
const rangeLabels = (f, l) => Array.from({ length: N }, (_, k) => (k < f ? "OAP" : k <= l ? "IN" : "OBS"));
const short = { OAP: "oap", IN: "in", OBS: "obs" };

// -- building and painting ---------------------------------------------------------------
function build() {
  const strip = $("strip");
  for (let k = 0; k < N; k++) {
    const c = el("div", "slice");
    c.dataset.k = k;
    const head = el("div", "head");
    const pos = D.positions ? ` · ${D.positions[k] >= 0 ? "+" : ""}${Math.round(D.positions[k])} mm` : "";
    head.append(el("span", "num", `${k}${pos}`), el("span", "lab"));
    head.title = `slice ${k} (CSV slice ${D.slice_ids[k]}): ${D.sources[k]}`;
    const box = el("div", "imgbox");
    const base = el("img", "base");
    base.src = `/img/${D.sid}/${k}`;
    base.alt = `slice ${k}`;
    base.title = D.sources[k];
    const ov = el("img", "ov");
    ov.alt = "";
    ov.hidden = true;
    for (const i of [base, ov]) i.draggable = false;
    box.append(base, ov);
    const probs = el("div", "probs");
    for (const name of D.classes) {
      const row = el("div", "prow");
      const fill = el("span", `fill ${short[name]}`);
      row.append(el("span", "pname", name), el("span", "track"), el("span", "pval"));
      row.children[1].appendChild(fill);
      probs.appendChild(row);
    }
    const bounds = el("div", "bounds");
    bounds.append(el("span", "bf"), el("span", "bl"));
    c.append(head, box, el("div", "pred"), probs, bounds);
    c.addEventListener("mousedown", (ev) => {
      ev.preventDefault();
      drag = { from: k, last: ev.button === 2 || ev.shiftKey };
    });
    c.addEventListener("mouseenter", () => { if (drag) preview(drag.from, k); });
    c.addEventListener("mouseup", (ev) => {
      if (!drag) return;
      const d = drag;
      drag = null;
      preview(null);
      select(k);
      if (d.from !== k) edit("range", { first: Math.min(d.from, k), last: Math.max(d.from, k) });
      else if (d.last || ev.button === 2) edit("last", { k });
      else edit("first", { k });
    });
    c.addEventListener("contextmenu", (ev) => ev.preventDefault());
    cards.push(c);
    strip.appendChild(c);
  }
  document.addEventListener("mouseup", () => { drag = null; preview(null); });
}

function preview(a, b) {
  cards.forEach((c, k) => c.classList.toggle("preview", a !== null && k >= Math.min(a, b) && k <= Math.max(a, b)));
}

function paint() {
  const p = D.pred;
  cards.forEach((c, k) => {
    const lab = labels[k];
    c.dataset.label = lab || "";
    c.className = `slice ${lab ? short[lab] : "none"}`;
    c.classList.toggle("selected", k === selected);
    c.classList.toggle("playing", !!cine && cine.k === k);
    c.classList.toggle("disagree", !!(p && lab && lab !== p.labels[k]));
    c.querySelector(".lab").textContent = lab || "?";
    c.querySelector(".pred").textContent = p ? `model: ${p.labels[k]}` : "";
    c.querySelector(".pred").title = "the model's label";
    const rows = c.querySelectorAll(".prow");
    rows.forEach((r, j) => {
      const v = p ? p.probs[k][j] : 0;
      r.querySelector(".fill").style.width = `${100 * v}%`;
      r.querySelector(".pval").textContent = p ? v.toFixed(2) : "";
    });
    const [bf, bl] = c.querySelectorAll(".bounds span");
    bf.style.height = `${p ? 100 * p.first_in[k] : 0}%`;
    bl.style.height = `${p ? 100 * p.last_in[k] : 0}%`;
    bf.title = p ? `P(first IN = slice ${k}) = ${p.first_in[k].toFixed(3)}` : "";
    bl.title = p ? `P(last IN = slice ${k}) = ${p.last_in[k].toFixed(3)}` : "";
  });
  $("status").textContent = statusOf();
  $("status").className = `badge st-${statusOf()}`;
  $("where").textContent = `${N} slices, apex → base · stack ${D.position} of ${D.total}` +
    (D.frame !== null ? ` · frame ${D.frame}` : "");
  const r = p && p.range;
  $("sure").textContent = p
    ? `model: IN ${r ? r[0] + ".." + r[1] : "none"}, P(range) ${p.range_probability.toFixed(3)}` +
      ` · coverage ${p.coverage}` + (p.alternatives.length ? " · next: " + p.alternatives.map(
        (a) => `${a.range ? a.range[0] + ".." + a.range[1] : "none"} ${a.p.toFixed(2)}`).join(", ") : "")
    : D.pred_error ? `model failed on this stack: ${D.pred_error}` : "the model is still predicting…";
  $("b-accept").disabled = !p;
  $("b-undo").disabled = !undo.length;
  $("b-prev").disabled = D.prev === null;
  $("b-next").disabled = D.next === null;
  $("o-masks").disabled = !D.has_masks;
  $("o-cam").disabled = !(D.has_cam && p);
  $("b-cine").disabled = !D.has_cine;
  overlays();
}

function statusOf() {
  if (labels.some((l) => l === null)) return "unreviewed";
  if (!D.pred) return "labelled";
  return labels.every((l, k) => l === D.pred.labels[k]) ? "agreed" : "corrected";
}

function overlays() {
  const kind = $("o-cam").checked && !$("o-cam").disabled ? "cam" : $("o-masks").checked && !$("o-masks").disabled ? "masks" : null;
  cards.forEach((c, k) => {
    const ov = c.querySelector(".ov");
    ov.hidden = !kind;
    if (kind && ov.dataset.kind !== kind) { ov.src = `/img/${D.sid}/${k}?overlay=${kind}`; ov.dataset.kind = kind; }
  });
}

function say(text, bad) {
  $("msg").textContent = text;
  $("msg").className = bad ? "bad" : "ok";
}

function select(k) {
  if (cine && k !== cine.k) stopCine();
  selected = Math.max(0, Math.min(N - 1, k));
  paint();
}

// -- edits -------------------------------------------------------------------------------
function optimistic(op, a) {
  const r = inRange(labels);
  if (op === "first") return rangeLabels(a.k, Math.max(r ? r[1] : N - 1, a.k));
  if (op === "last") return rangeLabels(Math.min(r ? r[0] : 0, a.k), a.k);
  if (op === "range") return rangeLabels(a.first, a.last);
  if (op === "label") { const l = labels.slice(); l[a.k] = a.label; return l; }
  if (op === "set") return a.labels.slice();
  if (op === "accept") return D.pred.labels.slice();
  return labels;
}

function edit(op, args = {}, record = true) {
  if (op === "accept" && !D.pred) { say("the model has not predicted this stack yet", true); return; }
  if (record) undo.push(labels.slice());
  labels = optimistic(op, args);
  paint();
  send(Object.assign({ op }, args));
}

function send(body) {
  pending++;
  document.body.dataset.pending = pending;
  say("saving…");
  chain = chain.then(async () => {
    try {
      const r = await fetch(`/api/stack/${D.sid}/edit`, {
        method: "POST", keepalive: true, cache: "no-store",
        headers: { "Content-Type": "application/json", "X-Stackcls-Token": TOKEN },
        body: JSON.stringify(body),
      });
      if (!r.ok) throw new Error(await r.text());
      const out = await r.json();
      labels = out.labels;
      say("saved");
    } catch (err) {
      say(`NOT SAVED: ${err.message}`, true);
      await refresh();
    } finally {
      pending--;
      document.body.dataset.pending = pending;
      paint();
    }
  });
  return chain;
}

function doUndo() {
  if (!undo.length) { say("nothing to undo"); return; }
  const prev = undo.pop();
  edit("set", { labels: prev }, false);
}

async function refresh() {
  const r = await fetch(`/api/stack/${D.sid}`, { cache: "no-store" });
  if (!r.ok) return;
  const d = await r.json();
  Object.assign(D, d);
  if (!pending) labels = d.labels.slice();
  paint();
}

async function waitForModel() {
  // the background pass was told to do this stack next; ask until it has
  while (!D.pred && !D.pred_error && ["loading", "running"].includes(D.progress.model)) {
    await new Promise((res) => setTimeout(res, 500));
    await refresh();
  }
}

function go(sid) {
  if (sid === null || sid === undefined) return;
  chain.then(() => { location.href = `/stack/${sid}`; });
}

// -- cine --------------------------------------------------------------------------------
async function toggleCine() {
  if (cine) { stopCine(); return; }
  if (!D.has_cine) { say("no cine for this stack"); return; }
  const r = await fetch(`/api/cine/${D.sid}`);
  const n = r.ok ? (await r.json()).frames : 0;
  if (!n) { say("no cine for this stack"); return; }
  const k = selected;
  const frames = Array.from({ length: n }, (_, t) => { const i = new Image(); i.src = `/cine/${D.sid}/${k}/${t}`; return i; });
  const img = cards[k].querySelector(".base");
  let t = 0;
  cine = { k, timer: setInterval(() => { img.src = frames[t].src; t = (t + 1) % n; }, 90) };
  cards[k].classList.add("playing");
  say(`cine: slice ${k}, ${n} frames (c stops)`);
}

function stopCine() {
  if (!cine) return;
  clearInterval(cine.timer);
  const c = cards[cine.k];
  c.classList.remove("playing");
  c.querySelector(".base").src = `/img/${D.sid}/${cine.k}`;
  cine = null;
}

// -- keys and buttons --------------------------------------------------------------------
const KEYLABEL = { 1: "OAP", 2: "IN", 3: "OBS", o: "OAP", i: "IN", b: "OBS" };

document.addEventListener("keydown", (ev) => {
  if (ev.altKey) return;
  if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "z") { ev.preventDefault(); doUndo(); return; }
  if (ev.ctrlKey || ev.metaKey) return;
  const key = ev.key;
  if (key === "ArrowRight") select(selected + 1);
  else if (key === "ArrowLeft") select(selected - 1);
  else if (key in KEYLABEL) edit("label", { k: selected, label: KEYLABEL[key] });
  else if (key === "a" || key === "[") edit("first", { k: selected });
  else if (key === "z" || key === "]") edit("last", { k: selected });
  else if (key === "y" || key === "Enter") edit("accept");
  else if (key === "u") doUndo();
  else if (key === "n") go(D.next);
  else if (key === "p") go(D.prev);
  else if (key === "q") chain.then(() => { location.href = "/"; });
  else if (key === "m") { $("o-masks").checked = !$("o-masks").checked; if ($("o-masks").checked) $("o-cam").checked = false; overlays(); }
  else if (key === "g") { $("o-cam").checked = !$("o-cam").checked; if ($("o-cam").checked) $("o-masks").checked = false; overlays(); }
  else if (key === "c") toggleCine();
  else if (key === "h" || key === "?") $("help").hidden = !$("help").hidden;
  else return;
  ev.preventDefault();
});

$("b-accept").addEventListener("click", () => edit("accept"));
$("b-undo").addEventListener("click", doUndo);
$("b-prev").addEventListener("click", () => go(D.prev));
$("b-next").addEventListener("click", () => go(D.next));
$("b-cine").addEventListener("click", toggleCine);
$("b-help").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
$("o-masks").addEventListener("change", () => { if ($("o-masks").checked) $("o-cam").checked = false; overlays(); });
$("o-cam").addEventListener("change", () => { if ($("o-cam").checked) $("o-masks").checked = false; overlays(); });
// buttons must not keep the focus: Enter would press them again instead of accepting the model
document.querySelectorAll("button, input").forEach((b) => b.addEventListener("focus", () => b.blur()));

build();
paint();
document.body.dataset.pending = 0;
document.body.dataset.ready = "1";
waitForModel();
