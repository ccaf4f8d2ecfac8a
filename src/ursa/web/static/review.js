// Ursa review page. Plain JS, no build step. The server journals every decision at once, so the page
// holds no state a reload could lose: it renders /api/state and posts each decision as it is made.
"use strict";

let state = null;       // the last /api/state
let cards = [];          // every card element, in page order (an image may appear in several groups)
let focusIdx = 0;

const $ = (sel, el = document) => el.querySelector(sel);

function showStatus(msg, ok = false) {
  const el = $("#status");
  el.textContent = msg;
  el.className = ok ? "ok" : "";
  el.hidden = !msg;
}

async function call(method, url, body) {
  // Every change is a JSON POST (also those without parameters): the server refuses anything else, so no
  // other web page can submit a form to it.
  const send = method !== "GET";
  const res = await fetch(url, {
    method,
    headers: send ? { "Content-Type": "application/json" } : {},
    body: send ? JSON.stringify(body || {}) : undefined,
  });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  }
  return data;
}

function fmtPct(x) {
  const v = parseFloat(x);
  return Number.isFinite(v) ? `${Math.round(v * 100)}%` : "";
}

function describe(decision) {
  if (!decision) return "";
  if (decision.action === "relabel") return `relabel → ${decision.label}`;
  return decision.action === "keep" ? "keep" : "delete";
}

function renderCard(item, kind) {
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.id = item.id;
  card.dataset.kind = kind;
  const f = item.findings.find((x) => x.kind === kind) || item.findings[0];
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.name;
  img.src = `/img/${item.id}`;
  card.appendChild(img);

  const name = document.createElement("div");
  name.className = "name";
  name.textContent = item.name;
  const split = document.createElement("span");
  split.className = "split";
  split.textContent = item.split;
  name.append(" ", split);
  card.appendChild(name);

  const labels = document.createElement("div");
  labels.className = "labels";
  labels.innerHTML = "label: <b></b>";
  $("b", labels).textContent = item.label;
  if (f.suggested) {
    const s = document.createElement("span");
    s.innerHTML = " · suggested: <b></b> <span class='conf'></span>";
    $("b", s).textContent = f.suggested;
    $(".conf", s).textContent = fmtPct(f.confidence);
    labels.appendChild(s);
  }
  card.appendChild(labels);

  const detail = document.createElement("div");
  detail.className = "detail";
  detail.textContent = f.detail;
  card.appendChild(detail);

  const dec = document.createElement("div");
  dec.className = "decision";
  card.appendChild(dec);

  const actions = document.createElement("div");
  actions.className = "actions";
  const keep = document.createElement("button");
  keep.type = "button"; keep.textContent = "Keep"; keep.dataset.act = "keep";
  keep.onclick = () => decide(item.id, "keep");
  actions.appendChild(keep);
  if (f.suggested) {
    const acc = document.createElement("button");
    acc.type = "button"; acc.textContent = `Relabel → ${f.suggested}`; acc.dataset.act = "accept";
    acc.onclick = () => decide(item.id, "relabel", f.suggested);
    actions.appendChild(acc);
  }
  const sel = document.createElement("select");
  sel.setAttribute("aria-label", "relabel to");
  sel.innerHTML = "<option value=''>relabel…</option>";
  state.classes.forEach((c, i) => {
    const o = document.createElement("option");
    o.value = c; o.textContent = i < 9 ? `${i + 1}: ${c}` : c;
    sel.appendChild(o);
  });
  sel.onchange = () => { if (sel.value) decide(item.id, "relabel", sel.value); sel.value = ""; };
  actions.appendChild(sel);
  const del = document.createElement("button");
  del.type = "button"; del.textContent = "Delete"; del.dataset.act = "delete";
  del.onclick = () => decide(item.id, "delete");
  actions.appendChild(del);
  card.appendChild(actions);
  card.onclick = (ev) => { if (ev.target.tagName !== "SELECT") setFocus(cards.indexOf(card), false); };
  updateCard(card, item);
  return card;
}

function updateCard(card, item) {
  card.classList.remove("d-keep", "d-relabel", "d-delete", "gone");
  if (item.decision) card.classList.add(`d-${item.decision.action}`);
  if (!item.in_dataset) card.classList.add("gone");
  $(".labels b", card).textContent = item.label;
  $(".decision", card).textContent = item.in_dataset ? describe(item.decision) : "in quarantine (applied)";
}

function updateItem(item) {
  state.items[item.id] = item;
  for (const c of cards) if (c.dataset.id === item.id) updateCard(c, item);
}

function updateProgress(pending) {
  const ids = Object.keys(state.items);
  const decided = ids.filter((id) => state.items[id].decision).length;
  $("#progress").textContent = `${decided} of ${ids.length} flagged images decided · ${pending} pending until Apply`;
}

function setFocus(i, scroll = true) {
  if (!cards.length) return;
  focusIdx = Math.max(0, Math.min(cards.length - 1, i));
  cards.forEach((c, j) => c.classList.toggle("focus", j === focusIdx));
  if (scroll) cards[focusIdx].scrollIntoView({ block: "nearest", behavior: "smooth" });
}

// ---- pool picks (ursa review DATA --run RUN --pool DIR): label a copy into a class, skip, undo ----

function describePool(item) {
  if (item.status === "labelled") return `labelled ${item.label} → ${item.copy}`;
  if (item.status === "skipped") return "skipped";
  return item.exists ? "" : "no longer in the pool";
}

function updatePoolCard(card, item) {
  state.pool.items[item.id] = item;
  card.classList.toggle("d-relabel", item.status === "labelled");
  card.classList.toggle("d-keep", item.status === "skipped");
  $(".decision", card).textContent = describePool(item);
  for (const b of card.querySelectorAll("[data-pool-open]")) b.disabled = item.status !== "open";
  $("[data-act='pool-undo']", card).disabled = item.status === "open";
  updatePoolProgress();
}

function updatePoolProgress() {
  const items = Object.values(state.pool.items);
  const done = items.filter((x) => x.status !== "open").length;
  const labelled = items.filter((x) => x.status === "labelled").length;
  $("#pool-progress").textContent = `${done} of ${items.length} picks done · ${labelled} copied into the dataset`;
}

async function poolAct(card, url, body) {
  try {
    const res = await call("POST", url, body);
    updatePoolCard(card, res.item);
    showStatus("");
  } catch (e) {
    showStatus(e.message);
  }
}

function renderPoolCard(item) {
  const card = document.createElement("div");
  card.className = "card pool";
  card.dataset.id = item.id;
  const img = document.createElement("img");
  img.loading = "lazy"; img.alt = item.name; img.src = `/img/${item.id}`;
  card.appendChild(img);
  const name = document.createElement("div");
  name.className = "name"; name.textContent = item.name;
  card.appendChild(name);
  const labels = document.createElement("div");
  labels.className = "labels";
  labels.innerHTML = "guess: <b></b> <span class='conf'></span>";
  $("b", labels).textContent = item.guess;
  $(".conf", labels).textContent = fmtPct(item.confidence);
  card.appendChild(labels);
  const detail = document.createElement("div");
  detail.className = "detail"; detail.textContent = item.reason;
  card.appendChild(detail);
  const dec = document.createElement("div");
  dec.className = "decision";
  card.appendChild(dec);
  const actions = document.createElement("div");
  actions.className = "actions";
  const acc = document.createElement("button");
  acc.type = "button"; acc.textContent = `Accept: ${item.guess}`; acc.dataset.act = "pool-accept"; acc.dataset.poolOpen = "1";
  acc.onclick = () => poolAct(card, "/api/pool/label", { id: item.id, label: item.guess });
  actions.appendChild(acc);
  const sel = document.createElement("select");
  sel.setAttribute("aria-label", "pick class"); sel.dataset.poolOpen = "1";
  sel.innerHTML = "<option value=''>pick class…</option>";
  for (const c of state.classes) {
    const o = document.createElement("option");
    o.value = c; o.textContent = c;
    sel.appendChild(o);
  }
  sel.onchange = () => { if (sel.value) poolAct(card, "/api/pool/label", { id: item.id, label: sel.value }); sel.value = ""; };
  actions.appendChild(sel);
  const skip = document.createElement("button");
  skip.type = "button"; skip.textContent = "Skip"; skip.dataset.act = "pool-skip"; skip.dataset.poolOpen = "1";
  skip.onclick = () => poolAct(card, "/api/pool/skip", { id: item.id });
  actions.appendChild(skip);
  const undo = document.createElement("button");
  undo.type = "button"; undo.textContent = "Undo"; undo.dataset.act = "pool-undo";
  undo.onclick = () => poolAct(card, "/api/pool/undo", { id: item.id });
  actions.appendChild(undo);
  card.appendChild(actions);
  updatePoolCard(card, item);
  return card;
}

function renderPool(main) {
  const h = document.createElement("h2");
  h.id = "kind-pool";
  h.textContent = `Label next (${state.pool.ids.length})`;
  main.appendChild(h);
  const p = document.createElement("p");
  p.className = "help";
  p.textContent = `Photos from ${state.pool.dir} whose labels would help the model most. Labelling copies the photo into the class folder (the pool is not changed); undo moves the copy to .ursa/quarantine/.`;
  main.appendChild(p);
  const prog = document.createElement("p");
  prog.id = "pool-progress"; prog.className = "help";
  main.appendChild(prog);
  const grid = document.createElement("div");
  grid.className = "grid"; grid.dataset.kind = "pool";
  main.appendChild(grid);
  for (const id of state.pool.ids) grid.appendChild(renderPoolCard(state.pool.items[id]));
}

async function load() {
  state = await call("GET", "/api/state");
  const main = $("#groups");
  main.textContent = "";
  cards = [];
  if (state.pool) renderPool(main);
  for (const g of state.kinds) {
    const h = document.createElement("h2");
    h.textContent = `${g.title} (${g.ids.length})`;
    h.id = `kind-${g.kind}`;
    main.appendChild(h);
    if (g.help) {
      const p = document.createElement("p");
      p.className = "help"; p.textContent = g.help;
      main.appendChild(p);
    }
    const grid = document.createElement("div");
    grid.className = "grid";
    grid.dataset.kind = g.kind;
    for (const id of g.ids) {
      const card = renderCard(state.items[id], g.kind);
      grid.appendChild(card);
      cards.push(card);
    }
    main.appendChild(grid);
  }
  if (!state.kinds.length && !state.pool) main.innerHTML = "<p class='help'>No findings: nothing to review.</p>";
  $("#classkeys").textContent = state.classes.slice(0, 9).map((c, i) => `${i + 1} = ${c}`).join(" · ");
  updateProgress(state.pending);
  setFocus(Math.min(focusIdx, cards.length - 1), false);
}

async function decide(id, action, label) {
  const item = state.items[id];
  try {
    const res = await call("POST", "/api/decide", { id, action, label: label || null, version: item.version });
    updateItem(res.item);
    updateProgress(res.pending);
    showStatus("");
    const cur = cards[focusIdx];
    if (cur && cur.dataset.id === id) setFocus(focusIdx + 1);
  } catch (e) {
    showStatus(e.message);
  }
}

async function undo() {
  try {
    const res = await call("POST", "/api/undo");
    if (res.item) {
      updateItem(res.item);
      const i = cards.findIndex((c) => c.dataset.id === res.item.id);
      if (i >= 0) setFocus(i);
    }
    updateProgress(res.pending);
    showStatus("");
  } catch (e) {
    showStatus(e.message);
  }
}

async function apply() {
  if (!window.confirm("Apply the decisions? This writes cleaned.csv and moves deleted images to .ursa/quarantine/ (undo with ursa review DATA --undo).")) return;
  try {
    const res = await call("POST", "/api/apply");
    await load();
    const c = res.counts;
    showStatus(`Applied: ${c.relabel} relabelled, ${c.delete} moved to quarantine, ${c.keep} kept. Wrote ${res.csv} (${res.n_images} images).`, true);
  } catch (e) {
    showStatus(e.message);
  }
}

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT") return;
  if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "z") { ev.preventDefault(); undo(); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const card = cards[focusIdx];
  const id = card && card.dataset.id;
  const key = ev.key;
  if (key === "j" || key === "ArrowRight") { ev.preventDefault(); setFocus(focusIdx + 1); }
  else if (key === "k" || key === "ArrowLeft") { ev.preventDefault(); setFocus(focusIdx - 1); }
  else if (key === "u") { undo(); }
  else if (!id) { return; }
  else if (key === " " || key === "s") { ev.preventDefault(); decide(id, "keep"); }
  else if (key === "x" || key === "Delete") { decide(id, "delete"); }
  else if (key === "a") {
    const item = state.items[id];
    const f = item.findings.find((x) => x.kind === card.dataset.kind) || item.findings[0];
    if (f.suggested) decide(id, "relabel", f.suggested);
    else showStatus("This image has no suggested label; use 1-9 or the relabel menu.");
  } else if (/^[1-9]$/.test(key)) {
    const c = state.classes[parseInt(key, 10) - 1];
    if (c) decide(id, "relabel", c);
  }
});

$("#undo").onclick = undo;
$("#apply").onclick = apply;
load().catch((e) => showStatus(`Could not load the findings: ${e.message}`));
