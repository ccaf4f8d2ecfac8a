// The prediction page: send a dropped, pasted or chosen photo to POST predict and draw the answer.
"use strict";
(function () {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  const result = document.getElementById("result");
  const preview = document.getElementById("preview");
  const statusEl = document.getElementById("status");
  const labelEl = document.getElementById("label");
  const detailEl = document.getElementById("detail");
  const bars = document.getElementById("bars");
  const errorEl = document.getElementById("error");
  const why = document.getElementById("why");
  const heatmap = document.getElementById("heatmap");
  const explain = document.querySelector("main").dataset.explain === "yes";
  let previewUrl = null;
  let pending = 0; // only the latest request may draw

  const pct = (p) => (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";

  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  function draw(ans) {
    labelEl.textContent = ans.rejected ? "none of these" : ans.label;
    labelEl.className = ans.rejected ? "rejected" : "";
    const unfamiliar = ans.reason === "unfamiliar";
    detailEl.textContent = !ans.rejected
      ? `${pct(ans.prob)} sure · ${ans.ms.total.toFixed(0)} ms on the server`
      : unfamiliar
        ? `Unfamiliar: this photo is unlike every training photo (the closest class is ${ans.best} at ${pct(ans.prob)}).`
        : `Not confident, ${ans.reason || "unsure"}: the closest class is ${ans.best} at ${pct(ans.prob)}, under the threshold of ${pct(ans.threshold)}.`;
    bars.replaceChildren();
    ans.top.forEach((t, i) => {
      const li = document.createElement("li");
      li.className = i === 0 ? "first" : "";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * t.prob).toFixed(1) + "%";
      const name = document.createElement("span");
      name.textContent = t.label;
      const value = document.createElement("span");
      value.textContent = pct(t.prob);
      li.append(fill, name, value);
      bars.append(li);
    });
    why.hidden = !ans.heatmap;
    if (ans.heatmap) heatmap.src = ans.heatmap;
    statusEl.textContent = "Prediction";
  }

  async function send(file) {
    if (!file) return;
    errorEl.hidden = true;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "That"} is not an image (${file.type}). Choose a photo.`);
      return;
    }
    const mine = ++pending;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    result.hidden = false;
    statusEl.textContent = "Classifying…";
    labelEl.textContent = "";
    detailEl.textContent = "";
    bars.replaceChildren();
    why.hidden = true;
    const form = new FormData();
    form.append("file", file, file.name || "pasted-image");
    try {
      const resp = await fetch(explain ? "predict?top_k=5&heatmap=true" : "predict?top_k=5", { method: "POST", body: form });
      const body = await resp.json().catch(() => ({ detail: `the server answered ${resp.status}` }));
      if (mine !== pending) return;
      if (!resp.ok) {
        statusEl.textContent = "";
        showError(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
        return;
      }
      draw(body);
    } catch (err) {
      if (mine !== pending) return;
      statusEl.textContent = "";
      showError(`Could not reach the server (${err.message}). Is ursa serve still running?`);
    }
  }

  input.addEventListener("change", () => send(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    send(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = Array.from(e.clipboardData ? e.clipboardData.items : []).find((it) => it.type.startsWith("image/"));
    if (item) { e.preventDefault(); send(item.getAsFile()); }
  });
})();
