// The annotation page of `prefalign annotate`: two videos played together, one answer per aspect, saved by the
// server (the page shows "saved" only once the server says the answer is on disk).
"use strict";

const $ = (id) => document.getElementById(id);
const SYNC_TOLERANCE = 0.08;  // seconds the follower may drift from the leader before it is moved back
const FRAME = 1 / 25;

const state = {
  aspects: [], rows: [], total: 0, pair: null, choices: {}, cursor: 0, saving: false,
  loop: true, sound: "both",
};

async function api(path, options) {
  const response = await fetch(path, Object.assign({ cache: "no-store" }, options));
  let body = null;
  try { body = await response.json(); } catch (error) { /* no JSON: reported below */ }
  if (!response.ok || body === null) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ---- playback: both videos (and the separate speech, if any) from the same instant -----------------------------

function players() {
  const list = [$("left"), $("right")];
  if (state.pair && state.pair.media.speech) list.push($("speech"));
  return list;
}

function leader() {
  // The longer video leads, so that a loop never cuts the other short.
  const [left, right] = [$("left"), $("right")];
  return (right.duration || 0) > (left.duration || 0) ? right : left;
}

function playing() { return !leader().paused; }

function seekAll(t) {
  for (const m of players()) {
    m.currentTime = Math.max(0, Math.min(t, isFinite(m.duration) ? m.duration : t));
  }
}

async function playAll() {
  const lead = leader();
  if (lead.ended) seekAll(0);
  seekAll(lead.currentTime);
  try {
    await Promise.all(players().map((m) => m.play()));
  } catch (error) {
    players().forEach((m) => m.pause());
    setStatus("pending", "Press Space to play (the browser wants a key press before sound).");
  }
  renderTransport();
}

function pauseAll() {
  players().forEach((m) => m.pause());
  seekAll(leader().currentTime);
  renderTransport();
}

function togglePlay() { playing() ? pauseAll() : playAll(); }

function applySound() {
  const separate = Boolean(state.pair && state.pair.media.speech);
  $("left").muted = separate || state.sound === "right";
  $("right").muted = separate || state.sound === "left";
  $("sound").textContent = separate ? "Sound: speech file" : `Sound: ${state.sound}`;
  $("sound").disabled = separate;
}

function cycleSound() {
  state.sound = { both: "left", left: "right", right: "both" }[state.sound];
  applySound();
}

function toggleLoop() {
  state.loop = !state.loop;
  $("loop").setAttribute("aria-pressed", String(state.loop));
}

function onEnded(event) {
  if (event.target !== leader()) return;
  if (state.loop) { seekAll(0); playAll(); } else { pauseAll(); }
}

function tick() {
  const lead = leader();
  if (!lead.paused) {
    for (const m of players()) {
      if (m === lead || m.ended || lead.currentTime >= (m.duration || 0)) continue;
      if (m.paused) { m.play().catch(() => {}); }
      if (Math.abs(m.currentTime - lead.currentTime) > SYNC_TOLERANCE) m.currentTime = lead.currentTime;
    }
  }
  renderTransport();
  requestAnimationFrame(tick);
}

function renderTransport() {
  const lead = leader();
  const duration = isFinite(lead.duration) ? lead.duration : 0;
  $("time").textContent = `${lead.currentTime.toFixed(2)} / ${duration.toFixed(2)} s`;
  if (document.activeElement !== $("seek")) {
    $("seek").value = duration ? Math.round(1000 * lead.currentTime / duration) : 0;
  }
  $("play").textContent = lead.paused ? "▶ Play" : "❚❚ Pause";
}

function seekBy(seconds) {
  const lead = leader();
  seekAll(Math.max(0, Math.min(lead.currentTime + seconds, lead.duration || 0)));
}

// ---- the answer form ------------------------------------------------------------------------------------------

function buildForm() {
  const table = $("choices");
  state.rows = [...state.aspects, "overall"];
  state.rows.forEach((name, row) => {
    const tr = document.createElement("tr");
    const label = document.createElement("td");
    label.className = "name";
    label.textContent = name.replaceAll("_", " ");
    if (name === "overall") {
      const note = document.createElement("small");
      note.textContent = " (optional)";
      label.appendChild(note);
    }
    tr.appendChild(label);
    for (const [value, text] of [["left", "Left better (1)"], ["tie", "Tie (2)"], ["right", "Right better (3)"]]) {
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.textContent = text;
      button.dataset.row = String(row);
      button.dataset.value = value;
      button.addEventListener("click", () => choose(row, value));
      td.appendChild(button);
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { state.cursor = row; renderForm(); });
    table.appendChild(tr);
  });
}

function renderForm() {
  $("choices").querySelectorAll("tr").forEach((tr, row) => {
    tr.classList.toggle("current", row === state.cursor);
    tr.querySelectorAll("button").forEach((button) => {
      button.setAttribute("aria-pressed", String(state.choices[state.rows[row]] === button.dataset.value));
    });
  });
}

function choose(row, value) {
  state.choices[state.rows[row]] = value;
  state.cursor = Math.min(row + 1, state.rows.length - 1);
  if (!state.saving) setStatus("pending", "Not saved yet (Enter saves).");
  renderForm();
}

function moveCursor(step) {
  state.cursor = Math.max(0, Math.min(state.cursor + step, state.rows.length - 1));
  renderForm();
}

function setStatus(kind, text) {
  $("status").className = kind;
  $("status").textContent = text;
}

function renderProgress(done, total) {
  $("done").textContent = String(done);
  $("total").textContent = String(total);
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
}

// ---- moving between pairs and saving ------------------------------------------------------------------------------

async function show(index) {
  const pair = await api(`/api/pair/${index}`);
  players().forEach((m) => m.pause());
  state.pair = pair;
  state.choices = Object.assign({}, pair.answer || {});
  const open = state.rows.findIndex((name) => name !== "overall" && !(name in state.choices));
  state.cursor = open === -1 ? state.rows.length - 1 : open;
  $("finished").hidden = true;
  $("workspace").hidden = false;
  $("position").textContent = `${pair.index + 1} of ${pair.total}`;
  $("pair-id").textContent = pair.id;
  renderProgress(pair.done, pair.total);
  $("left").src = pair.media.left;
  $("right").src = pair.media.right;
  if (pair.media.speech) { $("speech").src = pair.media.speech; } else { $("speech").removeAttribute("src"); }
  players().forEach((m) => m.load());
  applySound();
  renderForm();
  setStatus(pair.answer ? "saved" : "", pair.answer ? "Answered earlier (saved). Enter saves a change." : "");
  playAll();
}

function finish(done, total) {
  players().forEach((m) => m.pause());
  state.pair = null;
  $("workspace").hidden = true;
  $("finished").hidden = false;
  $("position").textContent = "–";
  $("pair-id").textContent = "–";
  renderProgress(done, total);
}

async function save() {
  if (!state.pair || state.saving) return;
  const missing = state.aspects.filter((name) => !(name in state.choices));
  if (missing.length) {
    state.cursor = state.rows.indexOf(missing[0]);
    renderForm();
    setStatus("error", `Answer ${missing.map((name) => name.replaceAll("_", " ")).join(", ")} first.`);
    return;
  }
  state.saving = true;
  setStatus("pending", "Saving…");
  let reply;
  try {
    reply = await api("/api/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ index: state.pair.index, id: state.pair.id, choices: state.choices }),
    });
  } catch (error) {
    setStatus("error", `NOT saved: ${error.message}`);
    state.saving = false;
    return;
  }
  // Saved: a failure to load the next pair must not read as "NOT saved".
  setStatus("saved", `Saved ✓ pair ${reply.id}`);
  renderProgress(reply.done, reply.total);
  try {
    if (reply.next === null) { finish(reply.done, reply.total); } else { await show(reply.next); }
    setStatus("saved", `Saved ✓ pair ${reply.id}`);
  } catch (error) {
    fail(error);
  } finally {
    state.saving = false;
  }
}

function go(step) {
  if (state.saving) return;
  if (!state.pair) { if (step < 0) show(state.total - 1).catch(fail); return; }
  const index = state.pair.index + step;
  if (index < 0) return;
  show(index % state.total).catch(fail);
}

function fail(error) {
  $("fatal").hidden = false;
  $("fatal").textContent = `Error: ${error.message}`;
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;  // browser shortcuts (reload, ...) stay theirs
  const key = event.key;
  const actions = {
    "1": () => choose(state.cursor, "left"), "2": () => choose(state.cursor, "tie"),
    "3": () => choose(state.cursor, "right"),
    ArrowUp: () => moveCursor(-1), ArrowDown: () => moveCursor(1),
    Enter: save, n: () => go(1), N: () => go(1), b: () => go(-1), B: () => go(-1),
    " ": togglePlay, ArrowLeft: () => seekBy(event.shiftKey ? -FRAME : -0.5),
    ArrowRight: () => seekBy(event.shiftKey ? FRAME : 0.5), "0": () => seekAll(0), Home: () => seekAll(0),
    l: toggleLoop, L: toggleLoop, m: cycleSound, M: cycleSound,
  };
  if (!(key in actions)) return;
  if (!state.pair && !["b", "B"].includes(key)) return;
  event.preventDefault();  // Space must not scroll or press the focused button, arrows must not move the slider
  actions[key]();
}

async function start() {
  buildFormListeners();
  const status = await api("/api/state");
  state.aspects = status.aspects;
  state.total = status.total;
  $("annotator").textContent = status.annotator;
  buildForm();
  renderProgress(status.done, status.total);
  if (status.next === null) { finish(status.done, status.total); } else { await show(status.next); }
  requestAnimationFrame(tick);
}

function buildFormListeners() {
  $("play").addEventListener("click", togglePlay);
  $("loop").addEventListener("click", toggleLoop);
  $("sound").addEventListener("click", cycleSound);
  $("save").addEventListener("click", save);
  $("skip").addEventListener("click", () => go(1));
  $("back").addEventListener("click", () => go(-1));
  $("review").addEventListener("click", () => go(-1));
  $("seek").addEventListener("input", () => seekAll(($("seek").value / 1000) * (leader().duration || 0)));
  for (const m of [$("left"), $("right"), $("speech")]) m.addEventListener("ended", onEnded);
  $("seek").addEventListener("change", () => $("seek").blur());
  // A clicked button keeps the focus; Space or Enter would then press it as well as run their shortcut.
  document.addEventListener("click", (event) => { if (event.target.tagName === "BUTTON") event.target.blur(); });
  document.addEventListener("keydown", onKey);
}

start().catch(fail);
