// kvmem /dashboard: draws the states streamed by /dashboard/events (see kvmem/server/dashboard.py),
// or plays back a recording of `kvmem bench memory --record FILE` (see kvmem/bench/memory_recording.py).
"use strict";
(function () {
  const COLORS = {".": "#eef0f3", u: "#3b82f6", s: "#9333ea", c: "#f59e0b", m: "#3b82f6", r: "#94a3b8",
                  highlight: "#ef4444", reserved: "#c7d2fe", live: "#16a34a", hostkv: "#0ea5e9", hostact: "#14b8a6",
                  staging: "#a855f7"};
  const HISTORY_S = 300;
  let history = [];  // {t, physical, allocated, live, running, waiting, waste, hitrate, tps, preemptions}
  let state = null;
  let selected = null;  // seq id (string) clicked
  let hovered = null;   // seq id hovered in the list
  let cells = [];       // [{x, y, w, h, label}] of the last drawing, for the hover line

  const $ = (id) => document.getElementById(id);

  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + u[i];
  }
  const pct = (x) => (100 * x).toFixed(1) + "%";

  function legend(items) {
    $("legend").innerHTML = items.map(([cls, text]) => `<span><i class="sw ${cls}"></i>${text}</span>`).join("");
  }

  function focusSeq() { return hovered !== null ? hovered : selected; }

  function setupCanvas(canvas, height) {
    const w = canvas.clientWidth || 900;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = w * ratio; canvas.height = height * ratio; canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, height);
    return [ctx, w];
  }

  // One square per block, all the same size: the grid is to scale (a block is block_bytes).
  // `color(i)`: the block's fill; `hl`: the set of block indices drawn highlighted.
  function drawGrid(ctx, w, y0, n, color, hl, label, cell) {
    const cols = Math.max(1, Math.floor(w / cell));
    for (let i = 0; i < n; i++) {
      const x = (i % cols) * cell, y = y0 + Math.floor(i / cols) * cell;
      ctx.fillStyle = color(i);
      ctx.fillRect(x, y, cell - 1, cell - 1);
      if (hl.has(i)) {  // an outline, so the block's own state stays visible
        ctx.strokeStyle = COLORS.highlight; ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cell - 3, cell - 3);
      }
      cells.push({x, y, w: cell, h: cell, label: label(i)});
    }
    return y0 + Math.ceil(n / cols) * cell;
  }
  const cellSize = (w, n) => Math.max(4, Math.min(18, Math.floor(Math.sqrt((w * 260) / Math.max(n, 1)))));
  const gridHeight = (w, n, cell) => Math.ceil(n / Math.max(1, Math.floor(w / cell))) * cell;

  // A horizontal bar: `parts` [[value, color]] of `total`, with a caption on its left.
  function drawBar(ctx, w, y, caption, total, parts, note) {
    ctx.fillStyle = "#445"; ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(caption, 0, y + 11);
    const x0 = 150, bw = w - x0 - 4;
    ctx.fillStyle = COLORS["."]; ctx.fillRect(x0, y, bw, 14);
    let x = x0;
    for (const [value, color] of parts) {
      const pw = total ? bw * value / total : 0;
      ctx.fillStyle = color; ctx.fillRect(x, y, pw, 14); x += pw;
    }
    if (note) { ctx.fillStyle = "#223"; ctx.fillText(note, x0 + 4, y + 11); }
    cells.push({x: 0, y, w, h: 14, label: caption + (note ? ": " + note : "")});
    return y + 20;
  }

  function blockOwners(owners) {
    const by = {};
    for (const [seq, blocks] of Object.entries(owners || {}))
      for (const b of blocks) (by[b] = by[b] || []).push(seq);
    return by;
  }

  const STATE_NAMES = {".": "free", u: "in use", s: "shared", c: "cached (evictable)"};

  function drawBlocksMap(m, canvas) {
    const hybrid = m.kind === "hybrid", h = m.host || {};
    const w = canvas.clientWidth || 900, seq = focusSeq();
    const n = m.states.length, cell = cellSize(w, n);
    const hostCell = hybrid ? cellSize(w, Math.max(h.kv_blocks, h.act_blocks, 1)) : 0;
    const height = gridHeight(w, n, cell) + (hybrid ? 60 + gridHeight(w, h.kv_blocks, hostCell)
      + gridHeight(w, h.act_blocks, hostCell) + 40 : 4);
    const [ctx] = setupCanvas(canvas, Math.min(Math.max(height, 40), 1400));
    const owners = blockOwners(m.owners);
    const hl = new Set(seq !== null && m.owners && m.owners[seq] ? m.owners[seq] : []);
    let highlighted = hl.size;
    let y = drawGrid(ctx, w, 0, n, (i) => COLORS[m.states[i]] || "#000", hl, (i) =>
      `block ${i}: ${STATE_NAMES[m.states[i]]}` + (owners[i] ? `, held by seq ${owners[i].join(", ")}` : ""), cell);
    const items = [["free", "free"], ["used", "in use"], ["cached", "cached (evictable)"], ["shared", "shared"],
                   ["highlight", "selected request"]];
    if (hybrid) {
      // The host tier: KV blocks and activation blocks (K,V recomputed from them), each to scale
      // among its own kind; the staging buffers the host-resident sequences' layers go through.
      const kvOwner = {}, actOwner = {};
      for (const [s, blocks] of Object.entries(h.owners || {}))
        for (const [b, isAct] of blocks) (isAct ? actOwner : kvOwner)[b] = s;
      const mine = (owner) => new Set(Object.keys(owner).filter((b) => owner[b] === seq).map(Number));
      y += 8;
      y = drawBar(ctx, w, y, "staging buffers", 1, [[1, COLORS.staging]],
                  `${m.staging.buffers} buffers, ${bytes(m.staging.bytes)} of device memory`);
      for (const [name, owner, total, color, bb] of [["host KV blocks", kvOwner, h.kv_blocks, COLORS.hostkv, h.kv_block_bytes],
                                                     ["host activation blocks", actOwner, h.act_blocks, COLORS.hostact, h.act_block_bytes]]) {
        ctx.fillStyle = "#445"; ctx.fillText(`${name}: ${Object.keys(owner).length} of ${total} in use (${bytes(bb || 0)} each)`, 0, y + 11);
        y += 16;
        const hlHost = mine(owner);
        highlighted += hlHost.size;
        y = drawGrid(ctx, w, y, total, (i) => owner[i] !== undefined ? color : COLORS["."], hlHost,
                     (i) => `${name.replace(" blocks", "")} block ${i}: ` + (owner[i] !== undefined ? `seq ${owner[i]}` : "free"),
                     hostCell) + 6;
      }
      items.push(["host-kv", "host KV"], ["host-act", "host activations"], ["staging", "staging"]);
    }
    canvas.dataset.highlighted = String(highlighted);  // how many blocks are drawn highlighted (tests read it)
    legend(items);
    $("map-note").textContent = `${n} blocks of ${m.block_size} tokens (${bytes(m.block_bytes)})` +
      (hybrid ? " in the device tier; the host tier below" : "");
  }

  function drawSlots(m, canvas) {
    const rows = m.slots, rowH = Math.max(6, Math.min(18, Math.floor(600 / Math.max(rows.length, 1))));
    const pages = m.kind === "slots_pages", top = pages ? 48 : 0;
    const [ctx, w] = setupCanvas(canvas, Math.min(rows.length * rowH + 4 + top, 1200));
    const seq = focusSeq();
    let highlighted = 0;
    if (pages) {  // the address space reserved for every slot at max length, and what is backed
      drawBar(ctx, w, 0, "reserved address space", 1, [[1, COLORS.reserved]], bytes(m.reserved_bytes));
      drawBar(ctx, w, 20, "physical (mapped)", m.reserved_bytes, [[m.physical_bytes, COLORS.m]],
              `${bytes(m.physical_bytes)} (${m.counts.mapped} of ${m.counts.budget} chunks of the budget)`);
    }
    rows.forEach((r, i) => {
      const y = top + i * rowH, mine = seq !== null && String(r.seq) === seq;
      if (!pages) {  // static: reserved max_model_len vs the tokens it holds
        ctx.fillStyle = r.seq === null ? COLORS["."] : mine ? "#fecaca" : COLORS.reserved;
        ctx.fillRect(0, y, w, rowH - 1);
        ctx.fillStyle = mine ? COLORS.highlight : COLORS.live;
        ctx.fillRect(0, y, w * r.live / m.slot_tokens, rowH - 1);
        if (mine) highlighted++;
        cells.push({x: 0, y, w, h: rowH, label: `slot ${i}: ` + (r.seq === null ? "free" :
          `seq ${r.seq}, ${r.live} of ${m.slot_tokens} reserved tokens live`)});
        return;
      }
      const n = r.pages.length, cw = w / n;  // one cell per chunk (page set)
      for (let j = 0; j < n; j++) {
        const c = r.pages[j];
        ctx.fillStyle = c === "." ? "#fff" : mine && c !== "r" ? COLORS.highlight : COLORS[c];
        if (mine && c !== "." && c !== "r") highlighted++;
        ctx.fillRect(j * cw, y, Math.max(cw - (cw > 3 ? 1 : 0), 1), rowH - 1);
      }
      ctx.strokeStyle = "#ccd"; ctx.strokeRect(0.5, y + 0.5, w - 1, rowH - 2);
      ctx.fillStyle = "#000"; ctx.fillRect(0, y + rowH - 3, w * r.live / (n * m.chunk_tokens), 2);
      const count = (re) => (r.pages.match(re) || []).length;
      cells.push({x: 0, y, w, h: rowH, label: `slot ${i}: ` + (r.seq === null ? (r.cached ? "free, holds a cached prefix" : "free")
        : `seq ${r.seq}, ${r.live} tokens`) + `, ${count(/[^.]/g)} of ${n} chunks mapped` +
        (count(/s/g) ? `, ${count(/s/g)} shared` : "") + (count(/r/g) ? `, ${count(/r/g)} idle (awaiting reclamation)` : "")});
    });
    canvas.dataset.highlighted = String(highlighted);
    if (!pages) {
      legend([["free", "free slot"], ["reserved", "reserved"], ["live", "live tokens"], ["highlight", "selected request"]]);
      $("map-note").textContent = `${rows.length} slots of ${m.slot_tokens} tokens (${bytes(m.slot_bytes)}), one row each`;
    } else {
      legend([["unmapped", "unmapped"], ["mapped", "mapped"], ["shared", "shared"], ["cached", "free slot's cached prefix"],
              ["idle", "idle, awaiting reclamation"], ["highlight", "selected request"]]);
      $("map-note").textContent = `${rows.length} slots, one row each; a cell is a chunk of ${m.chunk_tokens} tokens ` +
        `(${bytes(m.chunk_bytes)})`;
    }
  }

  function drawMap() {
    if (!state) return;
    const m = state.map, canvas = $("map");
    cells = [];
    if (m.kind === "blocks" || m.kind === "hybrid") drawBlocksMap(m, canvas);
    else if (m.kind === "slots" || m.kind === "slots_pages") drawSlots(m, canvas);
    else {
      const [ctx] = setupCanvas(canvas, 30);
      ctx.fillStyle = "#445"; ctx.fillText(`${m.strategy}: no per-block picture; see the numbers`, 4, 18);
      legend([]);
    }
  }

  // Lines over the last HISTORY_S seconds; `max` fixed (ratios) or the largest value shown.
  function drawSeries(canvas, keys, colors, height, fmt, fixedMax) {
    const [ctx, w] = setupCanvas(canvas, height);
    ctx.strokeStyle = "#e5e7eb"; ctx.strokeRect(0.5, 0.5, w - 1, height - 1);
    if (history.length < 2) return;
    const t1 = history[history.length - 1].t, t0 = Math.max(t1 - HISTORY_S, history[0].t), span = Math.max(t1 - t0, 1e-9);
    let max = fixedMax || 1;
    if (!fixedMax) for (const p of history) for (const k of keys) max = Math.max(max, p[k]);
    keys.forEach((k, i) => {
      ctx.strokeStyle = colors[i]; ctx.lineWidth = 1.5; ctx.beginPath();
      history.forEach((p, j) => {
        const x = (p.t - t0) / span * (w - 2) + 1, y = height - 2 - p[k] / max * (height - 14);
        j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#667"; ctx.fillText(fmt(max), 4, 10);
  }

  function historyPoint(prev, s) {
    const st = s.stats, dt = prev ? s.time - prev.t : 0;
    return {t: s.time, physical: st.bytes_physical, allocated: st.bytes_allocated, live: st.bytes_live,
            running: s.num_running, waiting: s.num_waiting, preemptions: s.num_preemptions,
            waste: st.bytes_allocated ? 1 - st.bytes_live / st.bytes_allocated : 0, hitrate: st.prefix_hit_rate,
            gen: s.num_generation_tokens || 0,
            tps: prev && dt > 0 ? Math.max(0, ((s.num_generation_tokens || 0) - prev.gen) / dt) : 0};
  }

  function describe(m, seq) {
    const d = m.details && m.details[seq], parts = [`${m.requests[seq]} · seq ${seq}`];
    if (m.owners && m.owners[seq]) parts.push(`${m.owners[seq].length} blocks`);
    if (m.host && m.host.owners && m.host.owners[seq]) parts.push(`${m.host.owners[seq].length} host blocks`);
    if (d) {
      parts.push(`${d.prompt}+${d.output} tokens`);
      if (d.cached) parts.push(`prefix hit ${d.cached}`);
      if (d.preemptions) parts.push(`preempted ${d.preemptions}×`);
    }
    if (m.kind === "hybrid") parts.push(m.host.owners && m.host.owners[seq] ? "tier: host" : "tier: device");
    return parts.join(" · ");
  }

  let listKey = "";
  function renderRequests() {
    const m = state.map, ul = $("requests");
    const seqs = Object.keys(m.requests || {}).sort((a, b) => a - b);
    if (selected !== null && !seqs.includes(selected)) selected = null;
    if (hovered !== null && !seqs.includes(hovered)) hovered = null;
    const labels = seqs.map((seq) => describe(m, seq));
    const key = seqs.join(",") + "|" + labels.join("|");
    if (key !== listKey) {  // rebuilt only when it changed: a hovered item stays put
      listKey = key;
      ul.innerHTML = "";
      seqs.forEach((seq, i) => {
        const li = document.createElement("li");
        li.textContent = labels[i];
        li.dataset.seq = seq;
        ul.appendChild(li);
      });
      if (!seqs.length) ul.innerHTML = '<li class="note">none</li>';
    }
    for (const li of ul.querySelectorAll("li[data-seq]")) li.classList.toggle("selected", li.dataset.seq === selected);
  }
  // Delegated, so that items rebuilt under the pointer keep working.
  $("requests").addEventListener("mouseover", (e) => {
    const li = e.target.closest("li[data-seq]");
    const seq = li ? li.dataset.seq : null;
    if (seq !== hovered) { hovered = seq; drawMap(); }
  });
  $("requests").addEventListener("mouseleave", () => { hovered = null; drawMap(); });
  $("requests").addEventListener("click", (e) => {
    const li = e.target.closest("li[data-seq]");
    if (!li) return;
    selected = selected === li.dataset.seq ? null : li.dataset.seq;
    renderRequests(); drawMap();
  });

  function render() {
    const s = state.stats;
    $("strategy").textContent = s.strategy;
    $("stat-physical").textContent = bytes(s.bytes_physical);
    $("stat-allocated").textContent = bytes(s.bytes_allocated);
    $("stat-live").textContent = bytes(s.bytes_live);
    $("stat-cached").textContent = bytes(s.bytes_cached);
    $("stat-usage").textContent = pct(s.usage);
    $("stat-waste").textContent = pct(s.waste);
    $("stat-running").textContent = state.num_running;
    $("stat-waiting").textContent = state.num_waiting;
    $("stat-hitrate").textContent = pct(s.prefix_hit_rate);
    $("stat-preemptions").textContent = state.num_preemptions;
    const counts = state.map.counts || {};
    $("counts").innerHTML = Object.entries(counts).map(([k, v]) =>
      `<span>${k}: <b id="count-${k}" data-value="${v}">${v}</b></span>`).join("");
    const tiers = state.map.tiers || {};  // prefix-cache tiers below the budget (paged with --kv-offload-*)
    $("tiers").innerHTML = Object.entries(tiers).map(([k, t]) =>
      `<span>${k} tier: <b id="tier-${k}" data-value="${t.used_bytes}">${bytes(t.used_bytes)}</b> of ` +
      `${bytes(t.capacity_bytes)} (${t.blocks} blocks, ${t.hits} hits)</span>`).join("");
    renderRequests();
    drawMap();
    drawSeries($("ts-bytes"), ["physical", "allocated", "live"], ["#64748b", "#3b82f6", "#16a34a"], 100, bytes);
    drawSeries($("ts-seqs"), ["running", "waiting"], ["#16a34a", "#f59e0b"], 70, String);
    drawSeries($("ts-ratio"), ["waste", "hitrate"], ["#dc2626", "#9333ea"], 70, pct, 1);
    drawSeries($("ts-rate"), ["tps", "preemptions"], ["#0ea5e9", "#f97316"], 70, (v) => v.toFixed(0));
  }

  $("map").addEventListener("mousemove", (e) => {
    const r = e.target.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
    const c = cells.find((c) => x >= c.x && x < c.x + c.w && y >= c.y && y < c.y + c.h);
    $("hover").textContent = c ? c.label : "\u00a0";
  });
  window.addEventListener("resize", () => state && drawMap());

  function show(s) {
    state = s;
    render();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  // --- live: the server's stream ---------------------------------------------------------------
  let pending = null, scheduled = false, source = null;
  function onLiveState(data) {
    pending = data;  // coalesced: only the newest state is drawn, once per frame
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      history.push(historyPoint(history[history.length - 1], pending));
      while (history.length && history[0].t < pending.time - HISTORY_S) history.shift();
      show(pending);
    });
  }
  function goLive() {
    source = new EventSource("/dashboard/events");
    source.onopen = () => { $("conn").textContent = "live"; };
    source.onerror = () => { $("conn").textContent = "disconnected, retrying…"; };
    source.onmessage = (e) => onLiveState(JSON.parse(e.data));
  }

  // --- replay: a recording, every strategy side by side, step for step --------------------------
  const player = {byLabel: {}, labels: [], label: null, index: 0, timer: null, fps: 10};

  function frameAtStep(frames, step) {  // the last frame at or before `step`
    let lo = 0, hi = frames.length - 1, best = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (frames[mid].step <= step) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return best;
  }

  function showFrame() {
    const frames = player.byLabel[player.label], i = player.index, f = frames[i];
    history = [];
    for (let j = 0; j <= i; j++) history.push(historyPoint(history[history.length - 1], frames[j]));
    while (history.length && history[0].t < f.time - HISTORY_S) history.shift();
    $("replay-seek").max = String(frames.length - 1);
    $("replay-seek").value = String(i);
    $("replay-pos").textContent = `step ${f.step} (frame ${i + 1} of ${frames.length})`;
    $("compare").innerHTML = "<tr><th>strategy</th><th>physical</th><th>allocated</th><th>live</th><th>waste</th>" +
      "<th>running</th><th>waiting</th><th>preemptions</th></tr>" + player.labels.map((label) => {
        const g = player.byLabel[label][frameAtStep(player.byLabel[label], f.step)], st = g.stats;
        return `<tr${label === player.label ? ' class="current"' : ""} data-label="${label}"><td>${label}</td>` +
          `<td>${bytes(st.bytes_physical)}</td><td>${bytes(st.bytes_allocated)}</td><td>${bytes(st.bytes_live)}</td>` +
          `<td>${pct(st.waste)}</td><td>${g.num_running}</td><td>${g.num_waiting}</td><td>${g.num_preemptions}</td></tr>`;
      }).join("");
    show(f);
  }

  function choose(label) {
    const step = player.label ? player.byLabel[player.label][player.index].step : 0;
    player.label = label;
    player.index = frameAtStep(player.byLabel[label], step);
    $("replay-label").value = label;
    showFrame();
  }

  function play(on) {
    clearInterval(player.timer);
    player.timer = null;
    $("replay-play").textContent = on ? "pause" : "play";
    if (!on) return;
    player.timer = setInterval(() => {
      const frames = player.byLabel[player.label];
      if (player.index >= frames.length - 1) { play(false); return; }
      player.index++;
      showFrame();
    }, 1000 / player.fps);
  }

  function loadRecording(text, name) {
    const lines = text.split("\n").filter((l) => l.trim());
    let header = null;
    try { header = JSON.parse(lines[0]); } catch (e) { /* reported below */ }
    if (!header || header.format !== "kvmem-memory-recording") {
      $("conn").textContent = `${name}: not a kvmem memory recording`;
      return;
    }
    if (source) { source.close(); source = null; }
    player.byLabel = {}; player.labels = [];
    for (const line of lines.slice(1)) {
      const f = JSON.parse(line);
      if (!player.byLabel[f.label]) { player.byLabel[f.label] = []; player.labels.push(f.label); }
      player.byLabel[f.label].push(f);
    }
    if (!player.labels.length) { $("conn").textContent = `${name}: no frames`; return; }
    document.body.classList.add("replaying");
    $("conn").textContent = `replay: ${name}`;
    $("replay-label").innerHTML = player.labels.map((l) => `<option value="${l}">${l}</option>`).join("");
    player.label = null;
    choose(player.labels[0]);
    play(true);
  }

  $("replay-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) file.text().then((text) => loadRecording(text, file.name));
  });
  $("replay-play").addEventListener("click", () => play(!player.timer));
  $("replay-seek").addEventListener("input", (e) => { play(false); player.index = Number(e.target.value); showFrame(); });
  $("replay-label").addEventListener("change", (e) => choose(e.target.value));
  $("replay-speed").addEventListener("change", (e) => { player.fps = Number(e.target.value); if (player.timer) play(true); });
  $("compare").addEventListener("click", (e) => {
    const row = e.target.closest("tr[data-label]");
    if (row) choose(row.dataset.label);
  });

  const replay = new URLSearchParams(location.search).get("replay");
  if (replay) {
    $("conn").textContent = "loading the recording…";
    fetch(replay).then((r) => r.ok ? r.text() : Promise.reject(new Error(`${r.status}`)))
      .then((text) => loadRecording(text, replay))
      .catch((e) => { $("conn").textContent = `could not load ${replay}: ${e.message}`; });
  } else {
    goLive();
  }
})();
