// pneumoflag nursing station page: live worklist over server-sent events.
// Everything that came over MQTT is put on the page with textContent, never as HTML.
"use strict";

(() => {
  const PRIORITY_RANK = { urgent: 0, flag: 1, routine: 2 };
  const NAME_KEY = "pneumoflag.station.by";
  const SOUND_KEY = "pneumoflag.station.sound";

  const state = {
    rows: new Map(),      // event_id -> row from the server
    trs: new Map(),       // event_id -> <tr>
    pending: new Set(),   // acks sent, not yet seen on the acks topic
    devices: new Map(),
    errors: [],
    csrf: null,
    chime: false,
    offsetMs: 0,          // server clock minus this browser's clock
    loaded: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // ------------------------------------------------------------------ time
  const now = () => Date.now() + state.offsetMs;

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return h < 48 ? `${h} h ${String(m).padStart(2, "0")} min` : `${Math.floor(h / 24)} d`;
  }

  function clock(iso) {
    const t = Date.parse(iso);
    return isNaN(t) ? "?" : new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  const ageSeconds = (iso) => (now() - Date.parse(iso)) / 1000;

  // ------------------------------------------------------------------ messages to the nurse
  function say(text) {
    $("message").textContent = text || "";
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  // ------------------------------------------------------------------ sound (WebAudio, no file)
  let audio = null;
  let soundOn = false;

  function setSound(on, gesture) {
    soundOn = on && state.chime;
    const button = $("sound");
    button.hidden = !state.chime;
    button.setAttribute("aria-pressed", String(soundOn));
    localStorage.setItem(SOUND_KEY, soundOn ? "on" : "off");
    if (gesture) unlockAudio();
    soundLabel();
  }

  function soundLabel() {
    const blocked = soundOn && (!audio || audio.state !== "running");
    $("sound").textContent = !soundOn ? "Sound off" : blocked ? "Sound on (click to allow)" : "Sound on";
  }

  function unlockAudio() {
    // browsers start audio only after a click or a key press on the page
    if (!soundOn || !window.AudioContext) return;
    if (!audio) {
      audio = new AudioContext();
      audio.addEventListener("statechange", soundLabel);
    }
    if (audio.state === "suspended") audio.resume();
    soundLabel();
  }

  function chime() {
    if (!soundOn || !audio || audio.state !== "running") return;
    const start = audio.currentTime + 0.02;
    [880, 660, 880].forEach((freq, i) => {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.type = "sine";
      osc.frequency.value = freq;
      const t = start + i * 0.22;
      gain.gain.setValueAtTime(0.0001, t);
      gain.gain.exponentialRampToValueAtTime(0.3, t + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, t + 0.2);
      osc.connect(gain).connect(audio.destination);
      osc.start(t);
      osc.stop(t + 0.21);
    });
  }

  // ------------------------------------------------------------------ worklist
  const closed = (row) => Boolean(row.ack || row.superseded_by);

  function order(a, b) {
    const done = (closed(a) ? 1 : 0) - (closed(b) ? 1 : 0);
    if (done) return done;
    const rank = (PRIORITY_RANK[a.priority] ?? 9) - (PRIORITY_RANK[b.priority] ?? 9);
    if (rank) return rank;
    const age = Date.parse(a.sort_at) - Date.parse(b.sort_at);
    return age || (a.event_id < b.event_id ? -1 : 1);
  }

  function fillRow(tr, row) {
    tr.className = `row prio-${row.priority}` + (row.ack ? " acked" : "") + (row.escalation ? " is-escalated" : "")
      + (row.superseded_by ? " superseded" : "");
    tr.dataset.eventId = row.event_id;
    tr.dataset.priority = row.priority;
    tr.tabIndex = 0;
    const cells = [];

    const prio = el("td", "prio");
    prio.append(el("span", `badge badge-${row.priority}`, String(row.priority).toUpperCase()));
    cells.push(prio);

    cells.push(el("td", "num prob", Number(row.probability).toFixed(4)));

    const file = el("td", "file");
    if (row.accession_number) {
      file.append(el("span", "acc", `Acc. ${row.accession_number}`));
      file.append(el("span", "path", row.file));
    } else {
      file.append(el("span", "path-main", row.file));
    }
    if (row.study) file.append(...studyParts(row.study));
    cells.push(file);

    cells.push(el("td", "device", row.device));
    const age = el("td", "num age", duration(ageSeconds(row.sort_at)));
    age.dataset.since = row.sort_at;
    cells.push(age);
    const ttn = el("td", "num ttn", duration(row.ttn_s));
    ttn.title = row.ttn_s === null ? "the appliance did not say when the image was written" : "image written → flag received here";
    cells.push(ttn);

    const status = el("td", "status");
    if (row.escalation) status.append(el("span", "escalated", `escalated (${row.escalation})`));
    if (row.superseded_by) status.append(el("span", "replaced", replacedText(row)));
    if (row.ack) {
      status.append(el("span", "ackinfo", `acknowledged by ${row.ack.by} (${row.ack.station}) at ${clock(row.ack.at)}`));
    } else if (row.superseded_by) {
      // nothing more to say: the newer result is its own row (or an error)
    } else if (state.pending.has(row.event_id)) {
      status.append(el("span", "pending", "sending acknowledgement…"));
    } else {
      status.append(el("span", "open", "open"));
    }
    cells.push(status);

    const action = el("td", "action");
    const button = el("button", "ack", "Acknowledge");
    button.type = "button";
    button.disabled = closed(row);
    button.setAttribute("aria-label", `Acknowledge ${row.priority} ${row.accession_number || row.file} on ${row.device}`);
    button.addEventListener("click", () => acknowledge(row.event_id));
    action.append(button);
    cells.push(action);

    tr.replaceChildren(...cells);
  }

  // a study's flag: the study's current result (the highest of its images), how many were scored, which views
  // were refused and why, and whether the study closed (no new image for a while)
  function studyParts(study) {
    const n = Number(study.images);
    const parts = [el("span", "study", `Study · ${n} image${n === 1 ? "" : "s"}${study.closed ? " · closed" : ""}`)];
    const refused = (study.rejected || []).map((v) => `${v.file} (${v.reason})`);
    if (refused.length) parts.push(el("span", "rejected-views", `not scored: ${refused.join(", ")}`));
    return parts;
  }

  function replacedText(row) {
    return row.study ? "replaced by a newer result for this study" : "replaced by a newer result for this file";
  }

  function renderRows() {
    const focused = document.activeElement;
    const focusedTr = focused && focused.closest ? focused.closest("tr[data-event-id]") : null;
    const focusedId = focusedTr ? focusedTr.dataset.eventId : null;
    const onButton = focused && focused.tagName === "BUTTON" && focusedTr;

    const rows = [...state.rows.values()].sort(order);
    const body = $("rows");
    rows.forEach((row, i) => {
      let tr = state.trs.get(row.event_id);
      if (!tr) {
        tr = document.createElement("tr");
        state.trs.set(row.event_id, tr);
      }
      fillRow(tr, row);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    $("empty").hidden = rows.length > 0;
    const open = rows.filter((r) => !closed(r)).length;
    $("open-count").textContent = `${open} open`;
    document.title = open ? `(${open}) pneumoflag station` : "pneumoflag station";

    if (focusedId && state.trs.has(focusedId)) {
      const tr = state.trs.get(focusedId);
      const target = onButton ? tr.querySelector("button") : tr;
      if (target && document.activeElement !== target && !target.disabled) target.focus();
      else if (target && target.disabled) tr.focus();
    }
  }

  function tickAges() {
    document.querySelectorAll("td.age").forEach((td) => {
      td.textContent = duration(ageSeconds(td.dataset.since));
    });
    renderDevices();
  }

  function upsertRow(row, live) {
    const before = state.rows.get(row.event_id);
    state.rows.set(row.event_id, row);
    if (row.ack) state.pending.delete(row.event_id);
    if (!live) return;
    const isNew = !before;
    const escalatedNow = before && row.escalation > (before.escalation || 0);
    if (!closed(row) && (isNew && row.priority === "urgent" || escalatedNow)) {
      chime();
      announce(`${escalatedNow ? "Escalated" : "New urgent"} flag: ${row.accession_number || row.file} on ${row.device}`);
    }
  }

  // ------------------------------------------------------------------ the detail panel (heat map)
  const detail = { id: null, shown: null };  // the open row, and the event whose <img> is in the panel

  function statusText(row) {
    const parts = [];
    if (row.escalation) parts.push(`escalated (${row.escalation})`);
    if (row.superseded_by) parts.push(replacedText(row));
    if (row.ack) parts.push(`acknowledged by ${row.ack.by} (${row.ack.station}) at ${clock(row.ack.at)}`);
    else if (!row.superseded_by) parts.push(state.pending.has(row.event_id) ? "sending acknowledgement…" : "open");
    return parts.join(" · ");
  }

  function noHeatmap(row, text) {
    const box = el("div", "no-heatmap");
    box.append(el("p", "no-heatmap-text", text));
    if (row.priority !== "routine" && !row.heatmap) {
      box.append(el("p", "hint", "An appliance with heat maps on sends one for flag and urgent images shortly "
        + "after the flag; it appears here when it arrives."));
    }
    return box;
  }

  function renderDetail() {
    const row = state.rows.get(detail.id);
    if (!row) return;
    const badge = $("detail-priority");
    badge.className = `badge badge-${row.priority}`;
    badge.textContent = String(row.priority).toUpperCase();
    $("detail-file").textContent = row.file;
    $("detail-accession").textContent = row.accession_number || "—";
    $("detail-prio").textContent = row.priority;
    $("detail-probability").textContent = Number(row.probability).toFixed(4);
    $("detail-device").textContent = row.device;
    const written = Date.parse(row.written_at);
    $("detail-written").textContent = isNaN(written) ? "—" : new Date(written).toLocaleString();
    $("detail-status").textContent = statusText(row);
    const frame = $("detail-image");
    if (!row.heatmap) {
      frame.replaceChildren(noHeatmap(row, "no heat map for this image"));
      detail.shown = null;
    } else if (detail.shown !== row.event_id) {  // the map of an event never changes: load it once
      const img = document.createElement("img");
      img.id = "detail-img";
      img.alt = `Heat-map overlay of ${row.accession_number || row.file}`;
      img.addEventListener("error", () => {
        if (detail.id === row.event_id) {
          frame.replaceChildren(noHeatmap(row, "the heat map could not be loaded (reload the page to try again)"));
        }
      });
      img.src = `/heatmap/${encodeURIComponent(row.event_id)}.png`;
      frame.replaceChildren(img);
      detail.shown = row.event_id;
    }
  }

  function openDetail(eventId) {
    if (!state.rows.has(eventId)) return;
    detail.id = eventId;
    detail.shown = null;
    renderDetail();
    const dialog = $("detail");
    if (!dialog.open) dialog.showModal();
    $("detail-close").focus();
  }

  function closeDetail() {
    const dialog = $("detail");
    if (dialog.open) dialog.close();
  }

  function onDetailClosed() {
    const tr = state.trs.get(detail.id);
    detail.id = null;
    detail.shown = null;
    $("detail-image").replaceChildren();
    if (tr && tr.isConnected) tr.focus();  // back where the nurse was
  }

  // ------------------------------------------------------------------ acknowledge
  async function acknowledge(eventId) {
    const row = state.rows.get(eventId);
    if (!row || closed(row)) return;
    const by = $("nurse-name").value.trim();
    if (!by) {
      say("Type your name in “Acknowledge as” first.");
      $("nurse-name").focus();
      return;
    }
    localStorage.setItem(NAME_KEY, by);
    state.pending.add(eventId);
    renderRows();
    let response;
    try {
      response = await fetch("/api/ack", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf || "" },
        body: JSON.stringify({ event_id: eventId, by }),
      });
    } catch (err) {
      state.pending.delete(eventId);
      renderRows();
      say("The station did not answer: the acknowledgement was not sent.");
      return;
    }
    if (response.status === 202) {
      const result = await response.json();
      say(result.delivered ? "" : "The broker is unreachable: the acknowledgement goes out when it is back.");
      return;
    }
    state.pending.delete(eventId);
    renderRows();
    if (response.status === 401 || response.status === 403) {
      say("Your session has ended: reload the page to acknowledge.");
    } else {
      let why = `error ${response.status}`;
      try { why = (await response.json()).error || why; } catch (e) { /* not JSON */ }
      say(`Not acknowledged: ${why}`);
    }
  }

  // ------------------------------------------------------------------ devices and errors
  function renderDevices() {
    const list = $("devices");
    const items = [...state.devices.values()].sort((a, b) => (a.device < b.device ? -1 : 1)).map((d) => {
      const li = el("li", "device");
      li.dataset.device = d.device;
      li.dataset.state = d.state;
      li.append(el("span", "device-name", d.device), el("span", `state state-${d.state}`, d.state));
      const parts = [];
      if (d.stats_at) {
        const age = Math.max(0, Math.round(ageSeconds(d.stats_at)));
        parts.push(`stats ${age < 60 ? `${age} s` : duration(age)} ago`);
      }
      const s = d.stats || {};
      if (s.scored !== undefined) parts.push(`scored ${s.scored}`);
      if (s.errors !== undefined) parts.push(`errors ${s.errors}`);
      if (s.queue_depth !== undefined) parts.push(`queue ${s.queue_depth}`);
      if (s.outbox !== undefined) parts.push(`outbox ${s.outbox}`);
      if (s.p50_ms !== undefined) parts.push(`p50 ${Number(s.p50_ms).toFixed(0)} ms`);
      if (parts.length) li.append(el("span", "detail", parts.join(" · ")));
      if (d.drift && (d.drift.state === "watch" || d.drift.state === "alarm")) {
        // the drift monitor: what this device scores no longer looks like its validation data
        const note = el("span", `drift drift-${d.drift.state}`, `drift ${d.drift.state}: ${d.drift.reason}`);
        note.setAttribute("role", "status");
        li.append(note);
      }
      if (d.missed) {
        // flags numbered by the device that never reached this station; the station asks for them again
        const shown = d.missed_ranges || [];
        const ranges = shown.map(([a, b]) => (a === b ? `#${a}` : `#${a}–${b}`)).join(", ");
        const more = shown.reduce((n, [a, b]) => n + b - a + 1, 0) < d.missed ? ", …" : "";
        const note = el("span", "missed", `${d.missed} flag${d.missed === 1 ? "" : "s"} from ${d.device} not received `
          + `(${ranges}${more}): asking it to send them again`);
        note.setAttribute("role", "status");
        li.append(note);
      }
      return li;
    });
    list.replaceChildren(...items);
    $("no-devices").hidden = items.length > 0;
    renderDriftBanner();
  }

  // a device in drift alarm: a banner above the worklist, for every nurse, until the device's state clears
  // (nobody can dismiss it here: it goes when the device says its scores look like its validation data again)
  function renderDriftBanner() {
    const alarmed = [...state.devices.values()].filter((d) => d.drift && d.drift.state === "alarm")
      .sort((a, b) => (a.device < b.device ? -1 : 1));
    const banner = $("drift-banner");
    banner.replaceChildren(...alarmed.map((d) => {
      const p = el("p", "drift-alarm", `Scores from ${d.device} no longer look like its validation data: re-validate. `);
      p.dataset.device = d.device;
      p.append(el("span", "drift-reason", d.drift.reason));
      return p;
    }));
    banner.hidden = alarmed.length === 0;
  }

  function renderErrors() {
    const items = state.errors.map((e) => {
      const li = el("li", "error");
      li.dataset.eventId = e.event_id;
      li.append(el("span", "reason", e.reason || "error"), el("span", "efile", e.file || "?"));
      li.append(el("span", "detail", `${e.device} · ${e.at ? clock(e.at) : ""} · ${e.message || ""}`));
      return li;
    });
    $("errors").replaceChildren(...items);
    $("no-errors").hidden = items.length > 0;
  }

  function renderLink(link, live) {
    const pill = $("link");
    if (!live) {
      pill.className = "pill pill-wait";
      pill.textContent = "station: reconnecting…";
    } else if (link.up) {
      pill.className = "pill pill-ok";
      pill.textContent = "live · broker connected";
    } else {
      pill.className = "pill pill-bad";
      pill.textContent = `broker ${link.text}`;
    }
  }

  // ------------------------------------------------------------------ the event stream
  let link = { up: false, text: "connecting" };

  function applySnapshot(s) {
    state.offsetMs = Date.parse(s.server_time) - Date.now();
    state.csrf = s.csrf;
    state.chime = Boolean(s.chime);
    $("station-id").textContent = s.station;
    $("logout").hidden = !s.login;
    const known = new Set(state.rows.keys());
    state.rows.clear();
    s.rows.forEach((row) => upsertRow(row, false));
    // urgent flags that came while this page was disconnected
    const missed = s.rows.filter((r) => state.loaded && !known.has(r.event_id) && !closed(r) && r.priority === "urgent");
    if (missed.length) {
      chime();
      announce(`${missed.length} new urgent flag${missed.length > 1 ? "s" : ""}`);
    }
    for (const [id, tr] of state.trs) {
      if (!state.rows.has(id)) { tr.remove(); state.trs.delete(id); }
    }
    state.devices = new Map(s.devices.map((d) => [d.device, d]));
    state.errors = s.errors;
    link = s.link;
    if (!state.loaded) setSound(localStorage.getItem(SOUND_KEY) !== "off", false);
    state.loaded = true;
    renderRows();
    renderDevices();
    renderErrors();
    renderLink(link, true);
    if (detail.id !== null) {
      if (state.rows.has(detail.id)) renderDetail(); else closeDetail();
    }
    document.body.dataset.ready = "true";
  }

  function connect() {
    const source = new EventSource("/events");
    const on = (kind, fn) => source.addEventListener(kind, (ev) => fn(JSON.parse(ev.data)));
    on("snapshot", applySnapshot);
    on("row", (row) => {
      upsertRow(row, true);
      renderRows();
      if (row.event_id === detail.id) renderDetail();  // a heat map (or an ack) for the open row
    });
    on("device", (d) => { state.devices.set(d.device, d); renderDevices(); });
    on("rejected", (e) => {
      if (state.errors.some((x) => x.event_id === e.event_id)) return;
      state.errors = [e, ...state.errors].slice(0, 20);
      renderErrors();
    });
    on("link", (l) => { link = l; renderLink(link, true); });
    source.onerror = () => {
      renderLink(link, false);
      if (source.readyState === EventSource.CLOSED) {
        // refused (logged out or session expired): the page itself goes to the login form
        setTimeout(() => window.location.reload(), 2000);
      }
    };
  }

  // ------------------------------------------------------------------ keyboard
  function moveFocus(step) {
    const trs = [...$("rows").children];
    if (!trs.length) return;
    const current = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest("tr[data-event-id]") : null;
    let i = current ? trs.indexOf(current) + step : 0;
    i = Math.max(0, Math.min(trs.length - 1, i));
    trs[i].focus();
  }

  document.addEventListener("keydown", (ev) => {
    unlockAudio();
    const t = ev.target;
    if ($("detail").open) {  // the panel is modal: Esc closes it, Tab stays inside, the row keys wait
      if (ev.key === "Escape") { closeDetail(); ev.preventDefault(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey || (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA"))) return;
    if ((ev.key === "Enter" || ev.key === " ") && t && t.matches && t.matches("tr[data-event-id]")) {
      openDetail(t.dataset.eventId);  // on the row itself; on its button, Enter and Space press the button
      ev.preventDefault();
    }
    else if (ev.key === "ArrowDown" || ev.key === "j") { moveFocus(1); ev.preventDefault(); }
    else if (ev.key === "ArrowUp" || ev.key === "k") { moveFocus(-1); ev.preventDefault(); }
    else if (ev.key === "a" || ev.key === "A") {
      const tr = t && t.closest ? t.closest("tr[data-event-id]") : null;
      if (tr) { acknowledge(tr.dataset.eventId); ev.preventDefault(); }
    }
  });
  document.addEventListener("pointerdown", unlockAudio);
  $("rows").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-event-id]");
    if (!tr || ev.target.closest("button")) return;  // the Acknowledge button does its own thing
    if (String(window.getSelection()).length) return;  // selecting text to copy it, not opening the row
    openDetail(tr.dataset.eventId);
  });
  $("detail").addEventListener("close", onDetailClosed);
  $("detail-close").addEventListener("click", closeDetail);
  $("detail").addEventListener("click", (ev) => {
    if (ev.target === $("detail")) closeDetail();  // a click on the backdrop (the panel itself has no padding)
  });

  // ------------------------------------------------------------------ start
  const name = $("nurse-name");
  name.value = localStorage.getItem(NAME_KEY) || "";
  name.addEventListener("change", () => localStorage.setItem(NAME_KEY, name.value.trim()));
  $("sound").addEventListener("click", () => {
    // "Sound on (click to allow)": the click is the permission, not a toggle
    if (soundOn && (!audio || audio.state !== "running")) unlockAudio();
    else setSound(!soundOn, true);
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": state.csrf || "" } });
    window.location.assign("/login");
  });
  setInterval(tickAges, 1000);
  connect();
})();
