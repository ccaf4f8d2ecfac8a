// Ursa Studio. Plain JS, no build step. The page holds no state of its own that a reload could lose:
// everything it shows comes from the JSON API (/api/project, /api/jobs, /api/runs, /api/review), and a
// running job's progress is followed again after a reload through /api/jobs/{id}/events.
"use strict";

(function () {
  const $ = (sel, el = document) => el.querySelector(sel);
  const $$ = (sel, el = document) => Array.from(el.querySelectorAll(sel));
  const el = (tag, props = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
    }
    e.append(...kids.filter((x) => x !== null && x !== undefined));
    return e;
  };
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  const FINAL = new Set(["done", "failed", "cancelled", "interrupted"]);
  const ACTIVE = new Set(["queued", "running"]);
  const IMAGE_EXT = /\.(jpe?g|png|webp|gif|bmp|tiff?|jfif|avif|heic)$/i;
  const BATCH_FILES = 64; // the server takes at most 64 files and 100 MiB per request
  const BATCH_BYTES = 90 * 2 ** 20;
  const BURST_FPS = 8;
  const LIVE_INTERVAL_MS = 333; // about 3 predictions a second from the live webcam

  // ---- talking to the server --------------------------------------------------------------------
  function message(data, res) {
    const d = data && (data.detail !== undefined ? data.detail : data.error);
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((x) => (x && x.msg ? `${(x.loc || []).slice(1).join(".")}: ${x.msg}` : JSON.stringify(x))).join("; ");
    if (d) return JSON.stringify(d);
    return `the server answered ${res.status} ${res.statusText}`;
  }

  // JSON in and out. Every change is a JSON request (also those without parameters): the server refuses
  // other content types on state-changing routes, so no other web page can post a form to it.
  async function api(method, url, body, { raw = false } = {}) {
    const opts = { method, headers: {} };
    if (method !== "GET") {
      if (raw) {
        opts.body = body; // FormData (the browser sets the multipart type) or text
        if (typeof body === "string") opts.headers["Content-Type"] = "text/plain; charset=utf-8";
      } else {
        opts.headers["Content-Type"] = "application/json";
        opts.body = JSON.stringify(body || {});
      }
    }
    let res;
    try {
      res = await fetch(url, opts);
    } catch (e) {
      const err = new Error(`Could not reach the studio server (${e.message}). Is \`ursa studio\` still running?`);
      err.status = 0;
      throw err;
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const err = new Error(message(data, res));
      err.status = res.status;
      throw err;
    }
    return data;
  }

  function showError(msg) {
    const box = $("#error");
    $("span", box).textContent = msg;
    box.hidden = !msg;
  }
  $("#error-close").addEventListener("click", () => showError(""));

  function setMsg(node, text, kind = "") {
    node.textContent = text || "";
    node.classList.toggle("ok", kind === "ok");
    node.classList.toggle("bad", kind === "bad");
  }

  // ---- formatting -----------------------------------------------------------------------------------
  const pct = (p, digits = 1) => (Number.isFinite(p) ? `${(100 * p).toFixed(digits)}%` : "–");
  const pctAuto = (p) => (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";
  function num(v, key) {
    if (typeof v !== "number") return v === null || v === undefined ? "" : String(v);
    if (!Number.isFinite(v)) return "–";
    if (key === "error_rate" || key === "accuracy") return pct(v);
    if (key === "lr") return v === 0 ? "0" : v.toExponential(1);
    if (key === "epoch" || Number.isInteger(v)) return String(v);
    if (key === "seconds") return v.toFixed(2);
    return v.toFixed(4);
  }
  function when(t) {
    if (!t) return "";
    const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
    if (Number.isNaN(d.getTime())) return String(t);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;
  // A thumbnail name from the API: relative to the project root ("cats/a.jpg"); a bare file name is
  // taken as one inside the class folder.
  const relName = (cls, name) => (name.includes("/") ? name : `${cls}/${name}`);
  const thumbUrl = (name) => `/api/thumb?name=${enc(name)}`;

  // ---- the webcam: one stream shared by every panel that shows it ---------------------------------
  const camera = {
    stream: null,
    users: new Set(),
    async open(video) {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("This browser gives no webcam to this page: open the studio at http://127.0.0.1 or localhost (or over HTTPS).");
      }
      if (!this.stream) {
        try {
          this.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
        } catch (e) {
          throw new Error(`No webcam: ${e.message || e.name}. Allow the camera for this page, or add photos from files instead.`);
        }
      }
      this.users.add(video);
      video.srcObject = this.stream;
      await video.play().catch(() => {});
      // the first frame may not be there yet; wait until the video has a size
      for (let i = 0; i < 50 && !video.videoWidth; i++) await sleep(50);
    },
    close(video) {
      video.srcObject = null;
      this.users.delete(video);
      if (!this.users.size && this.stream) {
        this.stream.getTracks().forEach((t) => t.stop());
        this.stream = null;
      }
    },
    // One frame as a JPEG Blob, at most 640 pixels on its longer side.
    frame(video, maxSide = 640) {
      const w = video.videoWidth, h = video.videoHeight;
      if (!w || !h) return Promise.resolve(null);
      const s = Math.min(1, maxSide / Math.max(w, h));
      const c = document.createElement("canvas");
      c.width = Math.round(w * s);
      c.height = Math.round(h * s);
      c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
      return new Promise((resolve) => c.toBlob(resolve, "image/jpeg", 0.9));
    },
  };

  // ---- state ------------------------------------------------------------------------------------------
  let project = null; // the last /api/project
  const jobs = new Map(); // id -> the newest snapshot seen (from /api/project or the event stream)
  const cards = new Map(); // class name -> its card element (kept across refreshes: open panels survive)
  let watching = null; // {id, source, poll}
  let resultsFor = null; // "run|issues_ready|exported" of what the Results section shows
  let shownRun = null; // the run the Results section shows (null: the latest)
  let review = null; // the last /api/review

  // ---- project ----------------------------------------------------------------------------------------
  // One request at a time; a refresh asked for while one is in flight runs once more after it (the one in
  // flight may have started before the change the caller wants to see).
  let inflight = null;
  let queued = null;
  function refresh() {
    if (!inflight) {
      inflight = (async () => {
        project = await api("GET", "/api/project");
        for (const j of project.jobs || []) jobs.set(j.id, j);
        render();
        watchNext();
      })().finally(() => { inflight = null; });
      return inflight;
    }
    if (!queued) queued = inflight.catch(() => {}).then(() => { queued = null; return refresh(); });
    return queued;
  }

  function render() {
    $("#root").textContent = project.root;
    document.title = `Ursa Studio · ${project.root.split(/[\\/]/).filter(Boolean).pop() || project.root}`;
    renderClasses();
    renderTrain();
    renderJobs();
    renderExport();
    renderTry();
    renderNext();
    const key = `${shownRun || project.latest_run}|${(project.runs || []).map((r) => `${r.name}:${r.exported}`).join(",")}|${issuesJobsDone()}`;
    if (key !== resultsFor) {
      resultsFor = key;
      loadResults();
    }
  }

  function issuesJobsDone() {
    return Array.from(jobs.values()).filter((j) => j.kind === "issues" && j.state === "done").length;
  }

  function activeJobs(kind) {
    return Array.from(jobs.values()).filter((j) => ACTIVE.has(j.state) && (!kind || j.kind === kind));
  }

  function renderNext() {
    const node = $("#next");
    const cls = project.classes || [];
    const ready = cls.filter((c) => c.count >= 2);
    const small = cls.filter((c) => c.count < 10);
    const training = activeJobs("train").length > 0;
    const runs = project.runs || [];
    const latest = runs.find((r) => r.name === project.latest_run);
    let text;
    let done = false;
    if (!cls.length) text = "Next: add a class for each kind of thing to recognise (type a name under Classes and press Add class).";
    else if (cls.length < 2) text = "Next: add a second class; a classifier needs at least two.";
    else if (ready.length < 2 || ready.length < cls.length) {
      const need = cls.filter((c) => c.count < 2).map((c) => c.name);
      text = `Next: add photos to ${need.join(", ")}: drop files or a folder on the class, use its Webcam, or paste URLs.`;
    } else if (training) text = "Training… follow the progress under Train. You can keep adding photos meanwhile.";
    else if (!runs.length) text = small.length ? `Ready to train (more photos would help ${small.map((c) => c.name).join(", ")}: 10 or more each). Press Train.` : "Ready: press Train.";
    else if (latest && !latest.exported) text = "Next: read the results, fix the flagged photos and train again, try the model under Try it, then export it.";
    else {
      text = "Done: the model is exported (download it under Export). Add photos or fix findings and train again to improve it.";
      done = true;
    }
    node.textContent = text;
    node.classList.toggle("done", done);
  }

  // ---- classes ----------------------------------------------------------------------------------------
  $("#add-class").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("#new-class");
    const name = input.value.trim();
    const msg = $("#add-class-msg");
    if (!name) return;
    try {
      await api("POST", "/api/classes", { name });
      input.value = "";
      setMsg(msg, `Added “${name}”. Now add photos to it.`, "ok");
      await refresh();
      const card = cards.get(name);
      if (card) $(".drop", card).focus();
    } catch (e) {
      setMsg(msg, e.message, "bad");
    }
  });

  function renderClasses() {
    const list = $("#class-list");
    const seen = new Set();
    for (const c of project.classes || []) {
      seen.add(c.name);
      let card = cards.get(c.name);
      if (!card) {
        card = makeCard(c.name);
        cards.set(c.name, card);
      }
      updateCard(card, c);
      // the server's order; a card is moved only when out of place (a move would drop its focus and the
      // pointer capture of a hold-to-record press)
      const want = list.children[seen.size - 1];
      if (want !== card) list.insertBefore(card, want || null);
    }
    for (const [name, card] of cards) {
      if (!seen.has(name)) {
        stopCard(card);
        card.remove();
        cards.delete(name);
      }
    }
    $("#project-warnings").replaceChildren(...(project.warnings || []).map((w) => el("li", { text: w })));
    if (!cards.size) list.replaceChildren(el("p", { class: "muted", text: "No classes yet." }));
    else $$(":scope > p", list).forEach((p) => p.remove());
    // recently removed classes, restorable (the toast is gone after a reload; this is not)
    const removedBox = $("#removed");
    const removed = (project.removed || []).filter((r) => !seen.has(r.name)).sort((a, b) => (b.seq || 0) - (a.seq || 0)).slice(0, 5);
    removedBox.replaceChildren();
    if (removed.length) {
      removedBox.append("Removed (in quarantine): ");
      for (const r of removed) {
        removedBox.append(el("span", { text: r.name }), el("button", { type: "button", class: "small", text: "Restore", "aria-label": `Restore class ${r.name}`, onclick: () => restoreClass(r.name) }), " ");
      }
    }
    removedBox.hidden = !removed.length;
  }

  function makeCard(name) {
    const card = $("#class-card").content.firstElementChild.cloneNode(true);
    card.dataset.name = name;
    const drop = $(".drop", card);
    const files = $("input.files", card);
    const folder = $("input.folder", card);
    const cls = () => card.dataset.name;

    $(".rename", card).addEventListener("click", () => {
      const form = $(".rename-form", card);
      form.hidden = false;
      const input = $(".rename-input", card);
      input.value = cls();
      input.focus();
      input.select();
    });
    $(".rename-cancel", card).addEventListener("click", () => { $(".rename-form", card).hidden = true; });
    $(".rename-input", card).addEventListener("keydown", (ev) => { if (ev.key === "Escape") $(".rename-form", card).hidden = true; });
    $(".rename-form", card).addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const to = $(".rename-input", card).value.trim();
      const from = cls();
      if (!to || to === from) { $(".rename-form", card).hidden = true; return; }
      try {
        await api("POST", `/api/classes/${enc(from)}/rename`, { to });
        cards.delete(from);
        card.dataset.name = to;
        cards.set(to, card);
        $(".rename-form", card).hidden = true;
        setMsg($(".status", card), `Renamed from “${from}”.`, "ok");
        await refresh();
      } catch (e) {
        setMsg($(".status", card), e.message, "bad");
      }
    });
    $(".remove", card).addEventListener("click", () => removeClass(cls()));

    $(".pick-files", card).addEventListener("click", () => files.click());
    $(".pick-folder", card).addEventListener("click", () => folder.click());
    files.addEventListener("change", () => { upload(card, Array.from(files.files), "upload"); files.value = ""; });
    folder.addEventListener("change", () => {
      const list = Array.from(folder.files).filter((f) => IMAGE_EXT.test(f.name));
      upload(card, list, "upload");
      folder.value = "";
    });
    drop.addEventListener("keydown", (ev) => {
      if ((ev.key === "Enter" || ev.key === " ") && ev.target === drop) { ev.preventDefault(); files.click(); }
    });
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", async (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      const list = await droppedFiles(ev.dataTransfer);
      upload(card, list, "upload");
    });

    // webcam: single shots and a hold-to-record burst
    const cam = $(".cam", card);
    const video = $("video", cam);
    $(".cam-open", card).addEventListener("click", async () => {
      cam.hidden = false;
      try {
        await camera.open(video);
        setMsg($(".status", card), "Point the camera at an example and press Snap, or hold Hold to record while you move it around.");
        $(".snap", cam).focus();
      } catch (e) {
        cam.hidden = true;
        setMsg($(".status", card), e.message, "bad");
      }
    });
    $(".cam-close", card).addEventListener("click", () => { stopBurst(card); camera.close(video); cam.hidden = true; });
    $(".snap", cam).addEventListener("click", async () => {
      const blob = await camera.frame(video);
      if (blob) sendBlobs(card, [blob], "webcam");
    });
    const hold = $(".hold", cam);
    hold.addEventListener("pointerdown", (ev) => { ev.preventDefault(); hold.setPointerCapture(ev.pointerId); startBurst(card); });
    hold.addEventListener("pointerup", () => stopBurst(card));
    hold.addEventListener("pointercancel", () => stopBurst(card));
    hold.addEventListener("keydown", (ev) => {
      if ((ev.key === " " || ev.key === "Enter") && !ev.repeat) { ev.preventDefault(); startBurst(card); }
    });
    hold.addEventListener("keyup", (ev) => { if (ev.key === " " || ev.key === "Enter") { ev.preventDefault(); stopBurst(card); } });
    hold.addEventListener("blur", () => stopBurst(card));
    // the release may land elsewhere when the page moves under the pointer: any release ends the burst
    window.addEventListener("pointerup", () => { if (card._burst) stopBurst(card); });

    // URL lists -> a download job
    const urls = $("form.urls", card);
    $(".urls-open", card).addEventListener("click", () => { urls.hidden = false; $("textarea", urls).focus(); });
    $(".urls-close", card).addEventListener("click", () => { urls.hidden = true; });
    urls.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = $("textarea", urls).value;
      if (!text.trim()) { setMsg($(".status", card), "Paste at least one image URL (http:// or https://).", "bad"); return; }
      const max = $("input.max", urls).value;
      try {
        const ans = await api("POST", `/api/classes/${enc(cls())}/urls${max ? `?max=${enc(max)}` : ""}`, text, { raw: true });
        $("textarea", urls).value = "";
        urls.hidden = true;
        card.dataset.job = ans.job;
        setMsg($(".status", card), "Download queued…");
        await refresh();
      } catch (e) {
        setMsg($(".status", card), e.message, "bad");
      }
    });
    return card;
  }

  function updateCard(card, c) {
    $(".name", card).textContent = c.name;
    const count = $(".count", card);
    count.textContent = plural(c.count, "photo");
    count.classList.toggle("few", c.count < 10);
    $(".drop", card).setAttribute("aria-label", `Add photos to ${c.name}: drop files or folders, paste, or press Enter to choose files`);
    $(".rename", card).setAttribute("aria-label", `Rename class ${c.name}`);
    $(".remove", card).setAttribute("aria-label", `Remove class ${c.name}`);
    const warnings = $(".warnings", card);
    warnings.replaceChildren(...(c.warnings || []).map((w) => el("li", { text: w })));
    const thumbs = (c.thumbs || []).map((t) => relName(c.name, t));
    const key = thumbs.join("\n");
    const box = $(".thumbs", card);
    if (box.dataset.key !== key || !box.childElementCount) {
      box.dataset.key = key;
      box.replaceChildren(...(thumbs.length
        ? thumbs.map((t) => el("img", { src: thumbUrl(t), alt: t, title: t, loading: "lazy" }))
        : [el("p", { class: "empty", text: "No photos yet." })]));
    }
    // a download job for this class: its progress under the card
    const job = Array.from(jobs.values()).filter((j) => j.kind === "download" && j.options && j.options.class === c.name).sort(byCreated)[0];
    if (job && (ACTIVE.has(job.state) || card.dataset.job === job.id)) showDownload(card, job);
  }

  function stopCard(card) {
    stopBurst(card);
    const video = $(".cam video", card);
    if (video.srcObject) camera.close(video);
  }

  async function removeClass(name) {
    try {
      const ans = await api("DELETE", `/api/classes/${enc(name)}`, {});
      const what = ans && Number.isInteger(ans.count) ? `its ${plural(ans.count, "photo")}` : "its photos";
      toast(`Removed class “${name}”: ${what} moved to ${(ans && ans.to) || "the quarantine"}.`, () => restoreClass(name, ans && ans.undo));
      await refresh();
    } catch (e) {
      showError(e.message);
    }
  }

  async function restoreClass(name, url) {
    try {
      await api("POST", url || `/api/classes/${enc(name)}/restore`, {});
      hideToast();
      await refresh();
    } catch (e) {
      showError(e.message);
    }
  }

  // Files of a drop: plain files, and the image files inside dropped folders (walked with webkitGetAsEntry).
  async function droppedFiles(dt) {
    const items = Array.from(dt.items || []);
    const entries = items.map((it) => (it.kind === "file" && it.webkitGetAsEntry ? it.webkitGetAsEntry() : null));
    if (!entries.some((e) => e && e.isDirectory)) return Array.from(dt.files || []);
    const out = [];
    const walk = async (entry) => {
      if (!entry) return;
      if (entry.isFile) {
        if (IMAGE_EXT.test(entry.name)) out.push(await new Promise((res, rej) => entry.file(res, rej)));
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        // readEntries answers in chunks (100 in Chromium) until it answers an empty list
        for (;;) {
          const chunk = await new Promise((res, rej) => reader.readEntries(res, rej));
          if (!chunk.length) break;
          for (const e of chunk) await walk(e);
        }
      }
    };
    for (const e of entries) await walk(e);
    return out;
  }

  // Upload files to a class in batches the server accepts; report ok / duplicate / refused.
  async function upload(card, files, source) {
    if (!files.length) {
      setMsg($(".status", card), "No image files in what was dropped.", "bad");
      return;
    }
    const status = $(".status", card);
    const drop = $(".drop", card);
    drop.classList.add("busy");
    const tally = { ok: 0, duplicate: 0, refused: 0, reasons: [] };
    let sent = 0;
    try {
      for (let i = 0; i < files.length;) {
        const batch = [];
        let bytes = 0;
        while (i < files.length && batch.length < BATCH_FILES && (bytes + files[i].size <= BATCH_BYTES || !batch.length)) {
          bytes += files[i].size;
          batch.push(files[i++]);
        }
        setMsg(status, `Uploading ${sent + batch.length} of ${files.length}…`);
        const ans = await postImages(card.dataset.name, batch.map((f) => [f, f.name || "image"]), source);
        count(tally, ans);
        sent += batch.length;
      }
    } catch (e) {
      drop.classList.remove("busy");
      setMsg(status, `${e.message}${sent ? ` (${sent} of ${files.length} sent before that)` : ""}`, "bad");
      await refresh().catch(() => {});
      return;
    }
    drop.classList.remove("busy");
    report(status, tally);
    await refresh().catch((e) => showError(e.message));
  }

  async function postImages(cls, pairs, source) {
    const form = new FormData();
    form.append("source", source);
    for (const [blob, name] of pairs) form.append("files", blob, name);
    return api("POST", `/api/classes/${enc(cls)}/images`, form, { raw: true });
  }

  function count(tally, ans) {
    for (const r of (ans && ans.results) || []) {
      if (r.status === "ok") tally.ok++;
      else if (r.status === "duplicate") tally.duplicate++;
      else { tally.refused++; tally.reasons.push(`${r.given}: ${r.reason}`); }
    }
  }

  function report(status, tally) {
    const parts = [`Added ${plural(tally.ok, "photo")}`];
    if (tally.duplicate) parts.push(`${tally.duplicate} already there`);
    if (tally.refused) parts.push(`${tally.refused} refused (${tally.reasons.slice(0, 3).join("; ")}${tally.reasons.length > 3 ? "; …" : ""})`);
    setMsg(status, parts.join(" · ") + ".", tally.refused && !tally.ok ? "bad" : "ok");
  }

  async function sendBlobs(card, blobs, source) {
    const status = $(".status", card);
    try {
      const stamp = Date.now();
      const ans = await postImages(card.dataset.name, blobs.map((b, i) => [b, `${source}-${stamp}-${i}.jpg`]), source);
      const tally = card._burst && card._burst.tally ? card._burst.tally : { ok: 0, duplicate: 0, refused: 0, reasons: [] };
      count(tally, ans);
      if (!card._burst || !card._burst.tally) report(status, tally);
      refresh().catch(() => {});
      return ans;
    } catch (e) {
      setMsg(status, e.message, "bad");
      return null;
    }
  }

  // Hold to record: ~8 frames a second, sent in batches of 8 while recording, the rest on release.
  function startBurst(card) {
    if (card._burst) return;
    const video = $(".cam video", card);
    const hold = $(".hold", card);
    const status = $(".status", card);
    const burst = { frames: [], taken: 0, sending: Promise.resolve(), tally: { ok: 0, duplicate: 0, refused: 0, reasons: [] } };
    card._burst = burst;
    hold.classList.add("recording");
    hold.textContent = "Recording…";
    const flush = () => {
      const batch = burst.frames.splice(0);
      if (batch.length) burst.sending = burst.sending.then(() => sendBlobs(card, batch, "webcam"));
    };
    burst.timer = setInterval(async () => {
      if (burst.taken >= 600) return; // 75 s at most in one hold
      burst.taken++;
      const blob = await camera.frame(video);
      if (blob) burst.frames.push(blob);
      setMsg(status, `Recording: ${plural(burst.taken, "frame")}…`);
      if (burst.frames.length >= BURST_FPS) flush();
    }, 1000 / BURST_FPS);
    burst.flush = flush;
  }

  async function stopBurst(card) {
    const burst = card._burst;
    if (!burst) return;
    clearInterval(burst.timer);
    const hold = $(".hold", card);
    hold.classList.remove("recording");
    hold.textContent = "Hold to record";
    await sleep(50); // a frame being encoded when the button went up
    burst.flush();
    await burst.sending;
    card._burst = null;
    report($(".status", card), burst.tally);
  }

  function showDownload(card, job) {
    const status = $(".status", card);
    if (ACTIVE.has(job.state)) {
      setMsg(status, `Downloading: ${pctAuto(job.progress || 0)} · ${job.stage || job.state}`);
    } else if (job.state === "done" && job.result) {
      const r = job.result;
      const reasons = Object.entries(r.reasons || {}).map(([k, v]) => `${k}: ${v}`).join("; ");
      setMsg(status, `Downloaded ${plural(r.ok || 0, "photo")} · ${r.duplicate || 0} duplicates · ${r.failed || 0} failed · ${r.skipped || 0} skipped${reasons ? ` (${reasons})` : ""}. Every URL's outcome is in ${r.manifest || ".ursa/manifest.csv"}.`, r.ok ? "ok" : "bad");
    } else {
      setMsg(status, `Download ${job.state}${job.error ? `: ${job.error}` : "."}`, job.state === "cancelled" ? "" : "bad");
    }
  }

  // ---- the undo toast -------------------------------------------------------------------------------
  let toastTimer = null;
  function toast(text, undo) {
    const t = $("#toast");
    $(".text", t).textContent = text;
    const btn = $(".undo", t);
    btn.hidden = !undo;
    btn.onclick = undo;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(hideToast, 15000);
  }
  function hideToast() { $("#toast").hidden = true; }
  $("#toast .close").addEventListener("click", hideToast);

  // ---- jobs -------------------------------------------------------------------------------------------
  // newest first; `created` is seconds or an ISO time (both sort by value)
  const stamp = (j) => (typeof j.created === "number" ? j.created : Date.parse(j.created || "") / 1000 || 0);
  const byCreated = (a, b) => stamp(b) - stamp(a) || String(b.id).localeCompare(String(a.id));
  const KIND_NAMES = { train: "Train", issues: "Find issues", export: "Export", download: "Download" };

  function jobTitle(j) {
    const o = j.options || {};
    if (j.kind === "download") return `Download into ${o.class}`;
    if (j.kind === "train") return `Train runs/${(j.result && j.result.run) || o.name || "run"}${o.arch && o.arch !== "efficientnet_lite0" ? ` (${o.arch})` : ""}`;
    if (j.kind === "issues") return `Find issues in ${o.run || "the run"}`;
    if (j.kind === "export") return `Export ${o.run || "the run"}`;
    return KIND_NAMES[j.kind] || j.kind;
  }

  function jobWhat(j) {
    if (j.state === "failed" || j.state === "interrupted") return j.error || (j.state === "interrupted" ? "the studio stopped while it ran; start it again" : "failed");
    if (j.state === "done") return j.seconds ? `took ${j.seconds.toFixed(1)} s` : "done";
    if (j.state === "cancelled") return j.started ? `stopped after ${(j.seconds || 0).toFixed(1)} s` : "cancelled before it started";
    if (j.state === "queued") return "waiting for the job before it";
    return j.stage && j.stage !== "queued" ? j.stage : "starting…";
  }

  // Rows are kept per job and updated in place: a snapshot arrives every quarter second while a job runs,
  // and a rebuilt row would take the keyboard focus (and a half-done click) away from its Cancel button.
  const jobRows = new Map();

  function jobRow(j) {
    let tr = jobRows.get(j.id);
    if (!tr) {
      const fill = el("span", { class: "fill" });
      fill.style.display = "block";
      tr = el("tr", { "data-id": j.id, "data-kind": j.kind },
        el("td", { class: "title" }),
        el("td", {}, el("span", { class: "state" })),
        el("td", {}, el("span", { class: "meter small" }, fill), el("span", { class: "pct" })),
        el("td", { class: "what" }),
        el("td", { class: "when" }),
        el("td", {}, el("button", { type: "button", class: "small cancel", text: "Cancel", onclick: () => cancelJob(j.id) })));
      jobRows.set(j.id, tr);
    }
    const p = j.state === "done" ? 1 : j.progress || 0;
    tr.dataset.state = j.state;
    $(".title", tr).textContent = jobTitle(j);
    const state = $(".state", tr);
    state.className = `state ${j.state}`;
    state.textContent = j.state;
    $(".meter .fill", tr).style.width = `${Math.round(100 * p)}%`;
    $(".pct", tr).textContent = ` ${pctAuto(p)}`;
    const what = $(".what", tr);
    what.textContent = jobWhat(j);
    what.classList.toggle("bad-text", j.state === "failed" || j.state === "interrupted");
    $(".when", tr).textContent = when(j.started || j.created);
    const cancel = $(".cancel", tr);
    cancel.hidden = !ACTIVE.has(j.state);
    cancel.setAttribute("aria-label", `Cancel ${jobTitle(j)}`);
    return tr;
  }

  function renderJobs() {
    const list = Array.from(jobs.values()).sort(byCreated).slice(0, 12);
    const body = $("#jobs-table tbody");
    list.forEach((j, i) => {
      const tr = jobRow(j);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    while (body.children.length > list.length) {
      const tr = body.lastElementChild;
      jobRows.delete(tr.dataset.id);
      tr.remove();
    }
    $("#jobs-table").hidden = !list.length;
    $("#jobs-empty").hidden = !!list.length;
  }

  async function cancelJob(id) {
    try {
      const snap = await api("POST", `/api/jobs/${enc(id)}/cancel`, {});
      if (snap && snap.id) jobs.set(snap.id, snap);
      renderAllJobs();
      await refresh();
    } catch (e) {
      showError(e.message);
    }
  }

  function renderAllJobs() {
    renderJobs();
    renderTrain();
    renderExport();
    if (project) for (const c of project.classes || []) { const card = cards.get(c.name); if (card) updateCard(card, c); }
  }

  // Follow one job at a time through its event stream (a browser holds few connections per server):
  // the running one, else the oldest queued. Jobs finishing one after the other are followed in turn.
  function watchNext() {
    const active = activeJobs().sort(byCreated).reverse();
    const next = active.find((j) => j.state === "running") || active[0];
    if (!next) return;
    if (watching && watching.id === next.id) return;
    if (watching && jobs.get(watching.id) && ACTIVE.has(jobs.get(watching.id).state)) {
      // the followed job is still active (e.g. queued behind the one that now runs): switch to the runner
      unwatch();
    }
    if (!watching) watch(next.id);
  }

  function unwatch() {
    if (!watching) return;
    if (watching.source) watching.source.close();
    watching.stopped = true;
    watching = null;
  }

  function watch(id) {
    unwatch();
    const w = { id, source: null, stopped: false };
    watching = w;
    if (typeof EventSource === "function") {
      const src = new EventSource(`/api/jobs/${enc(id)}/events`);
      w.source = src;
      src.onmessage = (ev) => {
        let snap;
        try { snap = JSON.parse(ev.data); } catch (e) { return; }
        onSnapshot(snap, w);
      };
      // The stream ends after the final state, and the browser would then reconnect: close instead, and
      // follow the job by polling in case the stream broke early.
      src.onerror = () => {
        src.close();
        if (!w.stopped) poll(w);
      };
    } else {
      poll(w);
    }
  }

  async function poll(w) {
    while (!w.stopped) {
      try {
        const snap = await api("GET", `/api/jobs/${enc(w.id)}`);
        onSnapshot(snap, w);
      } catch (e) {
        if (e.status === 404) { w.stopped = true; if (watching === w) watching = null; return; }
      }
      await sleep(1000);
    }
  }

  function onSnapshot(snap, w) {
    if (w.stopped) return;
    jobs.set(snap.id, snap);
    renderAllJobs();
    if (FINAL.has(snap.state)) {
      w.stopped = true;
      if (w.source) w.source.close();
      if (watching === w) watching = null;
      onJobEnd(snap);
    }
  }

  async function onJobEnd(snap) {
    await refresh().catch((e) => showError(e.message));
    if (snap.kind === "export" && snap.state === "done") renderExport();
    if ((snap.kind === "issues" || snap.kind === "train") && snap.state === "done") {
      resultsFor = null; // new numbers or new findings
      render();
    }
  }

  // ---- train ------------------------------------------------------------------------------------------
  function latestJob(kind) {
    return Array.from(jobs.values()).filter((j) => j.kind === kind).sort(byCreated)[0] || null;
  }

  function trainOptions() {
    const opts = { arch: $("#opt-arch").value, aug: $("#opt-aug").value };
    const intOf = (id, name) => {
      const v = $(id).value.trim();
      if (v === "") return;
      const n = Number(v);
      if (!Number.isInteger(n)) throw new Error(`${name} must be a whole number.`);
      return n;
    };
    const size = intOf("#opt-size", "Image size");
    if (size !== undefined) opts.size = size;
    const views = intOf("#opt-views", "Views per photo");
    if (views !== undefined) opts.views = views;
    const ft = intOf("#opt-fine-tune", "Fine-tune epochs");
    if (ft !== undefined) opts.fine_tune = ft;
    return opts;
  }

  $("#train-btn").addEventListener("click", async () => {
    const msg = $("#train-msg");
    try {
      const ans = await api("POST", "/api/train", trainOptions());
      setMsg(msg, "Training queued.");
      jobs.set(ans.job, { id: ans.job, kind: "train", state: "queued", progress: 0, stage: "", options: {}, created: Date.now() / 1000 });
      await refresh();
      watchNext();
    } catch (e) {
      setMsg(msg, e.message, "bad");
    }
  });
  $("#train-cancel").addEventListener("click", () => {
    const j = latestJob("train");
    if (j) cancelJob(j.id);
  });

  function renderTrain() {
    if (!project) return;
    const j = latestJob("train");
    const btn = $("#train-btn");
    const cancel = $("#train-cancel");
    const box = $("#train-progress");
    const msg = $("#train-msg");
    const cls = project.classes || [];
    const ready = cls.filter((c) => c.count >= 2).length;
    const active = j && ACTIVE.has(j.state);
    btn.disabled = !!active;
    btn.textContent = active ? "Training…" : (project.runs || []).length ? "Train again" : "Train";
    cancel.hidden = !active;
    if (!j) {
      box.hidden = true;
      if (!msg.classList.contains("bad")) setMsg(msg, ready >= 2 ? "" : "Needs at least 2 classes with 2 or more photos each (10+ is better).");
      return;
    }
    box.hidden = false;
    const p = j.state === "done" ? 1 : Math.max(0, Math.min(1, j.progress || 0));
    const meter = $(".meter", box);
    $(".fill", meter).style.width = `${(100 * p).toFixed(1)}%`;
    meter.setAttribute("aria-valuenow", String(Math.round(100 * p)));
    const stage = $(".stage", box);
    if (j.state === "running") stage.textContent = `${pctAuto(p)} · ${j.stage || "starting"}`;
    else if (j.state === "queued") stage.textContent = "Waiting for the job before it…";
    else if (j.state === "done") {
      const r = j.result || {};
      const m = r.metrics || {};
      stage.textContent = `Done: trained runs/${r.run || (j.options && j.options.name) || "run"}${j.seconds ? ` in ${j.seconds.toFixed(1)} s` : ""}${Number.isFinite(m.error_rate) ? ` · error rate ${pct(m.error_rate)}` : ""}. The results are below.`;
    } else if (j.state === "cancelled") stage.textContent = "Training was cancelled. Press Train to start again.";
    else stage.textContent = `Training ${j.state}: ${j.error || "see the log"}`;
    stage.className = `stage ${j.state === "failed" || j.state === "interrupted" ? "bad-text" : ""}`;
    if (!msg.classList.contains("bad") || active) setMsg(msg, "");
    renderEpochs(j.epochs || []);
    const log = (j.log || []).join("\n");
    const pre = $(".log pre", box);
    if (pre.textContent !== log) pre.textContent = log; // unchanged text keeps the reader's scroll position
  }

  function renderEpochs(rows) {
    const table = $("#epochs");
    table.hidden = !rows.length;
    if (!rows.length) return;
    // the columns people read first, then any others; bookkeeping columns and empty ones are left out
    const first = ["stage", "epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "lr", "seconds"];
    const skip = new Set(["type", "t", "batches", "iterations"]);
    const keys = new Set();
    for (const r of rows) for (const k of Object.keys(r)) if (!skip.has(k) && rows.some((x) => x[k] !== null && x[k] !== undefined && x[k] !== "")) keys.add(k);
    const cols = [...first.filter((k) => keys.has(k)), ...[...keys].filter((k) => !first.includes(k))];
    $("thead", table).replaceChildren(el("tr", {}, ...cols.map((c) => el("th", { text: c.replace(/_/g, " ") }))));
    $("tbody", table).replaceChildren(...rows.map((r) => el("tr", {}, ...cols.map((c) => el("td", { text: num(r[c], c) })))));
  }

  // ---- results ----------------------------------------------------------------------------------------
  $("#run-select").addEventListener("change", () => {
    const v = $("#run-select").value;
    shownRun = v === project.latest_run ? null : v;
    resultsFor = null;
    render();
  });

  let resultsSeq = 0;
  async function loadResults() {
    const mine = ++resultsSeq;
    const runs = project.runs || [];
    if (!runs.length) {
      $("#results-empty").hidden = false;
      $("#results-body").hidden = true;
      return;
    }
    let run;
    try {
      run = await api("GET", shownRun ? `/api/runs/${enc(shownRun)}` : "/api/runs/latest");
    } catch (e) {
      if (mine !== resultsSeq) return;
      $("#results-empty").hidden = false;
      $("#results-empty").textContent = e.status === 404 ? "No model yet. Press Train above; the numbers appear here." : `Could not read the results: ${e.message}`;
      $("#results-body").hidden = true;
      return;
    }
    if (mine !== resultsSeq) return;
    $("#results-empty").hidden = true;
    $("#results-body").hidden = false;
    drawResults(run);
    await loadReview(run);
  }

  function drawResults(run) {
    const sel = $("#run-select");
    sel.replaceChildren(...(project.runs || []).slice().reverse().map((r) => el("option", { value: r.name, text: `${r.name}${r.name === project.latest_run ? " (latest)" : ""}${Number.isFinite(r.error_rate) ? ` · error ${pct(r.error_rate)}` : ""}` })));
    sel.value = run.name;
    const m = run.metrics || {};
    $("#m-error").textContent = pct(m.error_rate);
    $("#m-acc").textContent = pct(m.accuracy);
    $("#m-valid").textContent = m.n_valid !== undefined ? String(m.n_valid) : "–";
    const info = [];
    if (m.n_train !== undefined) info.push(`${m.n_train} training photos`);
    if (m.n_skipped) info.push(`${m.n_skipped} skipped`);
    $("#run-info").textContent = info.join(" · ");

    // confusion matrix: rows actual, columns predicted
    const conf = run.confusion || { classes: [], matrix: [] };
    const table = $("#confusion");
    const max = Math.max(1, ...conf.matrix.flat());
    const head = el("tr", {}, el("th", { class: "axis row-head", text: "actual ↓ / predicted →" }), ...conf.classes.map((c) => el("th", { scope: "col", text: c })));
    const rows = conf.matrix.map((row, i) => el("tr", {}, el("th", { scope: "row", class: "row-head", text: conf.classes[i] }), ...row.map((n, j) => {
      const td = el("td", { class: n === 0 ? "zero" : i === j ? "diag" : "off", text: String(n) });
      if (n) td.style.background = i === j ? `rgba(58, 154, 87, ${(0.12 + 0.4 * n / max).toFixed(2)})` : `rgba(194, 55, 42, ${(0.15 + 0.45 * n / max).toFixed(2)})`;
      td.title = `${n} ${conf.classes[i]} photo${n === 1 ? "" : "s"} predicted as ${conf.classes[j]}`;
      return td;
    })));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));

    const confused = run.most_confused || [];
    $("#confused").replaceChildren(...(confused.length
      ? confused.slice(0, 10).map(([a, b, n]) => el("li", {}, el("b", { text: a }), ` taken for `, el("b", { text: b }), `: ${plural(n, "time")}`))
      : [el("li", { class: "muted", text: "None: every validation photo was classified right." })]));

    const per = run.per_class || [];
    $("#per-class").replaceChildren(
      el("thead", {}, el("tr", {}, ...["class", "precision", "recall", "F1", "valid photos"].map((t) => el("th", { text: t })))),
      el("tbody", {}, ...per.map((r) => el("tr", {}, el("td", { text: r.label }), el("td", { text: pct(r.precision) }), el("td", { text: pct(r.recall) }), el("td", { text: pct(r.f1) }), el("td", { text: String(r.support) })))));

    const plots = run.plots || {};
    $("#plots .plots").replaceChildren(...Object.entries(plots).map(([name, url]) => el("figure", {}, el("a", { href: url }, el("img", { src: url, alt: name, loading: "lazy" })), el("figcaption", { text: name }))));
    $("#plots").hidden = !Object.keys(plots).length;

    const losses = run.top_losses || [];
    $("#top-losses").replaceChildren(...(losses.length
      ? losses.slice(0, 12).map((t) => el("figure", {},
        t.img || t.name ? el("img", { src: t.name ? thumbUrl(t.name) : t.img, alt: t.name || "", title: t.name || "", loading: "lazy" }) : null,
        t.predicted !== t.label
          ? el("figcaption", {}, el("span", { class: "wrong", text: `said ${t.predicted} (${pctAuto(t.prob)})` }), el("br"), `is ${t.label}`)
          : el("figcaption", { class: "muted" }, `right: ${t.label}`, el("br"), `${pctAuto(t.p_actual !== undefined ? t.p_actual : t.prob)} sure`)))
      : [el("p", { class: "muted", text: "No validation photos." })]));
  }

  // ---- findings (the review session of the latest run) ------------------------------------------------
  async function loadReview(run) {
    const msg = $("#findings-msg");
    const box = $("#findings");
    const issuesJob = Array.from(jobs.values()).filter((j) => j.kind === "issues" && j.options && j.options.run === run.name).sort(byCreated)[0];
    if (!run.issues_ready) {
      box.hidden = true;
      if (issuesJob && ACTIVE.has(issuesJob.state)) msg.textContent = "Looking for mislabelled, duplicated and broken photos… (a job; see Jobs)";
      else if (issuesJob && issuesJob.state === "failed") msg.textContent = `Finding issues failed: ${issuesJob.error || ""}`;
      else msg.textContent = "Ursa looks for mislabelled, duplicated and broken photos after training; the list appears here.";
      return;
    }
    if (shownRun && shownRun !== project.latest_run) {
      box.hidden = true;
      msg.textContent = "Findings are reviewed on the latest run; choose it above.";
      return;
    }
    try {
      review = await api("GET", "/api/review");
    } catch (e) {
      box.hidden = true;
      msg.textContent = e.message;
      return;
    }
    drawReview();
  }

  function drawReview() {
    const box = $("#findings");
    const msg = $("#findings-msg");
    const groups = $("#review-groups");
    groups.replaceChildren();
    const kinds = review.kinds || [];
    if (!kinds.length) {
      box.hidden = true;
      msg.textContent = "No findings: Ursa found no mislabelled, duplicated or broken photos.";
      return;
    }
    msg.textContent = "";
    box.hidden = false;
    for (const g of kinds) {
      groups.append(el("h4", { text: `${g.title} (${g.ids.length})` }));
      if (g.help) groups.append(el("p", { class: "help", text: g.help }));
      groups.append(el("div", { class: "review-grid", "data-kind": g.kind }, ...g.ids.map((id) => reviewCard(review.items[id], g.kind))));
    }
    updateReviewBar();
  }

  function describe(d) {
    if (!d) return "";
    if (d.action === "relabel") return `relabel → ${d.label}`;
    return d.action === "keep" ? "keep" : "delete";
  }

  function reviewCard(item, kind) {
    const f = item.findings.find((x) => x.kind === kind) || item.findings[0] || {};
    const card = el("div", { class: "card", "data-id": item.id, "data-kind": kind });
    card.append(el("img", { src: thumbUrl(item.name), alt: item.name, loading: "lazy" }), el("div", { class: "fname", text: item.name }));
    const labels = el("div", { class: "labels" }, "label: ", el("b", { class: "current", text: item.label }));
    if (f.suggested) labels.append(" · suggested: ", el("b", { text: f.suggested }), " ", el("span", { class: "conf", text: f.confidence !== "" && f.confidence !== undefined ? pctAuto(parseFloat(f.confidence)) : "" }));
    card.append(labels, el("div", { class: "detail", text: f.detail || "" }), el("div", { class: "decision" }));
    const actions = el("div", { class: "actions" });
    actions.append(el("button", { type: "button", text: "Keep", "data-act": "keep", onclick: () => decide(item.id, "keep") }));
    if (f.suggested) actions.append(el("button", { type: "button", text: `Relabel → ${f.suggested}`, "data-act": "accept", onclick: () => decide(item.id, "relabel", f.suggested) }));
    const sel = el("select", { "aria-label": `relabel ${item.name} to` }, el("option", { value: "", text: "relabel…" }), ...(review.classes || []).map((c) => el("option", { value: c, text: c })));
    sel.addEventListener("change", () => { if (sel.value) decide(item.id, "relabel", sel.value); sel.value = ""; });
    actions.append(sel, el("button", { type: "button", text: "Delete", "data-act": "delete", onclick: () => decide(item.id, "delete") }));
    card.append(actions);
    updateReviewCard(card, item);
    return card;
  }

  function updateReviewCard(card, item) {
    card.classList.remove("d-keep", "d-relabel", "d-delete", "gone");
    if (item.decision) card.classList.add(`d-${item.decision.action}`);
    if (item.in_dataset === false) card.classList.add("gone");
    $(".labels b.current", card).textContent = item.label;
    $(".decision", card).textContent = item.in_dataset === false ? "in quarantine (applied)" : describe(item.decision);
  }

  function updateReviewItem(item) {
    review.items[item.id] = item;
    $$(`#review-groups .card[data-id="${item.id}"]`).forEach((c) => updateReviewCard(c, item));
  }

  function updateReviewBar() {
    const ids = Object.keys(review.items || {});
    const decided = ids.filter((id) => review.items[id].decision).length;
    $("#review-progress").textContent = `${decided} of ${ids.length} flagged photos decided · ${review.pending} waiting for Apply fixes`;
    $("#review-apply").disabled = !review.pending;
    $("#review-undo-apply").hidden = !review.applied;
  }

  async function decide(id, action, label) {
    const item = review.items[id];
    try {
      const res = await api("POST", "/api/review/decide", { id, action, label: label || null, version: item.version });
      updateReviewItem(res.item);
      review.pending = res.pending;
      updateReviewBar();
      setMsg($("#review-msg"), "");
    } catch (e) {
      setMsg($("#review-msg"), e.message, "bad");
      if (e.status === 409) reloadReview();
    }
  }

  async function reloadReview() {
    try { review = await api("GET", "/api/review"); drawReview(); } catch (e) { setMsg($("#review-msg"), e.message, "bad"); }
  }

  $("#review-undo").addEventListener("click", async () => {
    try {
      const res = await api("POST", "/api/review/undo", {});
      if (res.item) updateReviewItem(res.item);
      review.pending = res.pending;
      updateReviewBar();
      setMsg($("#review-msg"), res.item ? `Undid the decision on ${res.item.name}.` : "Undone.", "ok");
    } catch (e) {
      setMsg($("#review-msg"), e.message, "bad");
    }
  });

  $("#review-apply").addEventListener("click", async () => {
    try {
      const res = await api("POST", "/api/review/apply", {});
      const c = res.counts || {};
      await reloadReview();
      setMsg($("#review-msg"), `Applied: ${c.relabel || 0} relabelled, ${c.delete || 0} moved to quarantine, ${c.keep || 0} kept; cleaned.csv lists ${res.n_images} photos. Train again to use the fixes.`, "ok");
      await refresh();
    } catch (e) {
      setMsg($("#review-msg"), e.message, "bad");
    }
  });

  $("#review-undo-apply").addEventListener("click", async () => {
    try {
      const res = await api("POST", "/api/review/undo-apply", {});
      await reloadReview();
      setMsg($("#review-msg"), `Undid the apply: ${plural((res.restored || []).length, "photo")} back from quarantine.`, "ok");
      await refresh();
    } catch (e) {
      setMsg($("#review-msg"), e.message, "bad");
    }
  });

  // ---- try it -----------------------------------------------------------------------------------------
  const tryState = { live: false, previewUrl: null, seq: 0 };

  function renderTry() {
    const p = project.predictor || {};
    const help = $("#try-help");
    const exporting = activeJobs("export").length > 0;
    if (!p.run && exporting) help.textContent = "The model will be ready here when its export job is done (see Jobs); then show it a photo it has never seen: drop it here, paste it (Ctrl+V), choose a file, or use the live webcam.";
    else if (!p.run && (project.runs || []).length) help.textContent = "Export the model (step 5) to try it here.";
    else if (!p.run) help.textContent = "Train a model first; then show it a photo it has never seen: drop it here, paste it (Ctrl+V), choose a file, or use the live webcam.";
    else help.textContent = `Uses the exported model models/${p.run}${p.ready ? "" : " (loaded with the first photo)"}. Drop a photo here, paste it (Ctrl+V), choose a file, or point the live webcam at something.`;
  }

  function drawAnswer(ans) {
    const label = $("#try-label");
    label.textContent = ans.rejected ? "none of these" : ans.label;
    label.className = `label ${ans.rejected ? "rejected" : ""}`;
    $("#try-detail").textContent = ans.rejected
      ? (ans.reason === "unfamiliar"
        ? `Unfamiliar: this photo is unlike every training photo (the closest class is ${ans.best} at ${pctAuto(ans.prob)}).`
        : `Not confident, ${ans.reason || "unsure"}: the closest class is ${ans.best} at ${pctAuto(ans.prob)}, under the threshold of ${pctAuto(ans.threshold)}.`)
      : `${pctAuto(ans.prob)} sure${ans.ms && ans.ms.total !== undefined ? ` · ${ans.ms.total.toFixed(0)} ms on the server` : ""}`;
    $("#try-bars").replaceChildren(...(ans.top || []).slice(0, 3).map((t, i) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = `${(100 * t.prob).toFixed(1)}%`;
      return el("li", { class: i === 0 ? "first" : "" }, fill, el("span", { text: t.label }), el("span", { text: pctAuto(t.prob) }));
    }));
  }

  async function predict(blob, name) {
    const mine = ++tryState.seq;
    const form = new FormData();
    form.append("file", blob, name || "photo.jpg");
    try {
      const ans = await api("POST", "/api/predict?top_k=3", form, { raw: true });
      if (mine !== tryState.seq) return ans;
      $("#try-status").textContent = tryState.live ? "Live: about 3 predictions a second" : "Prediction";
      drawAnswer(ans);
      if (project && !(project.predictor || {}).ready) refresh().catch(() => {}); // the model is loaded now: say so
      return ans;
    } catch (e) {
      if (mine === tryState.seq) {
        $("#try-status").textContent = e.message;
        $("#try-label").textContent = "";
        $("#try-detail").textContent = "";
        $("#try-bars").replaceChildren();
      }
      throw e;
    }
  }

  function tryFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      $("#try-status").textContent = `${file.name || "That"} is not an image (${file.type}). Choose a photo.`;
      return;
    }
    stopLive();
    if (tryState.previewUrl) URL.revokeObjectURL(tryState.previewUrl);
    tryState.previewUrl = URL.createObjectURL(file);
    const img = $("#try-preview");
    img.src = tryState.previewUrl;
    img.hidden = false;
    $("#try-status").textContent = "Classifying…";
    predict(file, file.name).catch(() => {});
  }

  $("#try-choose").addEventListener("click", () => $("#try-file").click());
  $("#try-file").addEventListener("change", () => { tryFile($("#try-file").files[0]); $("#try-file").value = ""; });
  const tryDrop = $("#try-drop");
  tryDrop.addEventListener("dragover", (ev) => { ev.preventDefault(); tryDrop.classList.add("over"); });
  tryDrop.addEventListener("dragleave", () => tryDrop.classList.remove("over"));
  tryDrop.addEventListener("drop", (ev) => { ev.preventDefault(); tryDrop.classList.remove("over"); tryFile(ev.dataTransfer.files[0]); });
  tryDrop.addEventListener("keydown", (ev) => { if ((ev.key === "Enter" || ev.key === " ") && ev.target === tryDrop) { ev.preventDefault(); $("#try-file").click(); } });

  $("#try-live").addEventListener("click", () => (tryState.live ? stopLive() : startLive()));

  async function startLive() {
    const video = $("#try-video");
    video.hidden = false;
    $("#try-preview").hidden = true;
    try {
      await camera.open(video);
    } catch (e) {
      video.hidden = true;
      $("#try-status").textContent = e.message;
      return;
    }
    tryState.live = true;
    $("#try-live").textContent = "Stop webcam";
    $("#try-live").classList.add("recording");
    $("#try-status").textContent = "Live: starting…";
    // One request at a time, at most ~3 a second: a slow server is never flooded.
    while (tryState.live) {
      const t0 = performance.now();
      const blob = await camera.frame(video, 480);
      if (blob) {
        try {
          await predict(blob, "webcam.jpg");
        } catch (e) {
          // no model yet: wait while an export job runs (it makes one), else stop and say why
          if (e.status === 409 && activeJobs("export").length) {
            $("#try-status").textContent = "Waiting for the export to finish…";
            await sleep(1000);
          } else if (e.status === 409 || e.status === 0) { stopLive(); break; }
        }
      }
      await sleep(Math.max(0, LIVE_INTERVAL_MS - (performance.now() - t0)));
    }
  }

  function stopLive() {
    if (!tryState.live && !$("#try-video").srcObject) return;
    tryState.live = false;
    if ($("#try-status").textContent.startsWith("Live")) $("#try-status").textContent = "The last prediction from the webcam";
    const video = $("#try-video");
    camera.close(video);
    video.hidden = true;
    $("#try-live").textContent = "Live webcam";
    $("#try-live").classList.remove("recording");
  }

  // Paste: into the class whose card has focus, else into Try it.
  document.addEventListener("paste", (ev) => {
    const items = Array.from(ev.clipboardData ? ev.clipboardData.items : []).filter((it) => it.kind === "file" && it.type.startsWith("image/"));
    if (!items.length) return;
    const t = ev.target;
    if (t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "file"))) return;
    ev.preventDefault();
    const card = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".class-card") : null;
    if (card) upload(card, items.map((it) => it.getAsFile()), "paste");
    else {
      tryFile(items[0].getAsFile());
      $("#try").scrollIntoView();
    }
  });

  // ---- export -----------------------------------------------------------------------------------------
  function renderExport() {
    if (!project) return;
    const btn = $("#export-btn");
    const link = $("#export-link");
    const msg = $("#export-msg");
    const runs = project.runs || [];
    const name = shownRun || project.latest_run;
    const run = runs.find((r) => r.name === name);
    const j = Array.from(jobs.values()).filter((x) => x.kind === "export" && x.options && (!x.options.run || x.options.run === name)).sort(byCreated)[0];
    btn.disabled = !run || !!(j && ACTIVE.has(j.state));
    btn.textContent = run ? `Export ${run.name}${run.exported ? " again" : ""}` : "Export the model";
    btn.classList.toggle("primary", !(run && run.exported)); // once exported, the download is the next step
    let zip = null;
    if (j && j.state === "done" && j.result && j.result.zip) zip = j.result.zip;
    else if (run && run.exported) zip = `/api/exports/${enc(run.name)}.zip`;
    link.hidden = !zip;
    if (zip) {
      link.href = zip;
      link.textContent = `Download ${zip.split("/").pop()}`;
      link.classList.add("primary");
    }
    if (!run) setMsg(msg, "Train a model first.");
    else if (j && j.state === "queued") setMsg(msg, "Export queued: it starts when the job before it ends (see Jobs).");
    else if (j && ACTIVE.has(j.state)) setMsg(msg, `Exporting: ${pctAuto(j.progress || 0)} · ${j.stage || "starting…"}`);
    else if (j && (j.state === "failed" || j.state === "interrupted")) setMsg(msg, `Export ${j.state}: ${j.error || ""}`, "bad");
    else if (zip) setMsg(msg, `Saved in models/${run.name}/ in the project folder.`, "ok");
    else setMsg(msg, "");
  }

  $("#export-btn").addEventListener("click", async () => {
    const name = shownRun || project.latest_run;
    try {
      const ans = await api("POST", "/api/export", name ? { run: name } : {});
      jobs.set(ans.job, { id: ans.job, kind: "export", state: "queued", progress: 0, options: { run: name }, created: Date.now() / 1000 });
      renderExport();
      await refresh();
    } catch (e) {
      setMsg($("#export-msg"), e.message, "bad");
    }
  });

  // ---- keep in step ----------------------------------------------------------------------------------
  // Poll the project now and then (another tab, the CLI or a job may change it); faster while jobs run.
  let lost = false; // the last poll found no server
  async function loop() {
    for (;;) {
      await sleep(activeJobs().length ? 2500 : 8000);
      if (document.hidden) continue;
      try {
        await refresh();
        if (lost) { lost = false; showError(""); } // the server is back
      } catch (e) {
        if (e.status === 0) { lost = true; showError(e.message); }
      }
    }
  }

  refresh()
    .then(() => showError(""))
    .catch((e) => { showError(`Could not load the project: ${e.message}`); $("#next").textContent = "The studio server did not answer; start it with `ursa studio`."; })
    .finally(loop);
  window.addEventListener("pagehide", () => { unwatch(); stopLive(); });
})();
