// kvmem /dashboard: draws the states streamed by /dashboard/events (see kvmem/server/dashboard.py).
"use strict";
(function () {
  const COLORS = {".": "#eef0f3", u: "#3b82f6", s: "#9333ea", c: "#f59e0b", m: "#3b82f6",
                  highlight: "#ef4444", reserved: "#c7d2fe", live: "#16a34a", hostkv: "#0ea5e9", hostact: "#14b8a6"};
  const HISTORY_S = 300;
  const history = [];  // {t, physical, allocated, live, running, waiting}
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

  // blocks of a sequence (paged / hybrid device tier)
  function focusBlocks(m) {
    const seq = focusSeq();
    return new Set(seq !== null && m.owners && m.owners[seq] ? m.owners[seq] : []);
  }

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
  function drawBlocks(ctx, w, y0, states, hl, label) {
    const n = states.length;
    const cell = Math.max(4, Math.min(18, Math.floor(Math.sqrt((w * 260) / Math.max(n, 1)))));
    const cols = Math.max(1, Math.floor(w / cell));
    $("map").dataset.highlighted = String(hl.size);  // how many blocks are drawn highlighted (tests read it)
    for (let i = 0; i < n; i++) {
      const x = (i % cols) * cell, y = y0 + Math.floor(i / cols) * cell;
      ctx.fillStyle = COLORS[states[i]] || "#000";
      ctx.fillRect(x, y, cell - 1, cell - 1);
      if (hl.has(i)) {  // an outline, so the block's own state stays visible
        ctx.strokeStyle = COLORS.highlight; ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cell - 3, cell - 3);
      }
      cells.push({x, y, w: cell, h: cell, label: label(i)});
    }
    return y0 + Math.ceil(n / cols) * cell;
  }

  function blockOwners(m) {
    const owners = {};
    for (const [seq, blocks] of Object.entries(m.owners || {}))
      for (const b of blocks) (owners[b] = owners[b] || []).push(seq);
    return owners;
  }

  const STATE_NAMES = {".": "free", u: "in use", s: "shared", c: "cached (evictable)"};

  function drawMap() {
    if (!state) return;
    const m = state.map, canvas = $("map");
    cells = [];
    const kind = m.kind;
    if (kind === "blocks" || kind === "hybrid") {
      const owners = blockOwners(m);
      const est = Math.ceil(m.states.length / 60) * 18 + (kind === "hybrid" ? 70 : 10);
      const [ctx, w] = setupCanvas(canvas, Math.min(Math.max(est, 60), 900));
      const hl = focusBlocks(m);
      let y = drawBlocks(ctx, w, 0, m.states, hl, (i) =>
        `block ${i}: ${STATE_NAMES[m.states[i]]}` + (owners[i] ? `, held by seq ${owners[i].join(", ")}` : ""));
      legend([["free", "free"], ["used", "in use"], ["cached", "cached (evictable)"], ["shared", "shared"],
              ["highlight", "selected request"]].concat(kind === "hybrid" ? [["host-kv", "host KV"], ["host-act", "host activations"]] : []));
      $("map-note").textContent = `${m.states.length} blocks of ${m.block_size} tokens (${bytes(m.block_bytes)})` +
        (kind === "hybrid" ? " on the device; host tier below" : "");
      if (kind === "hybrid") {
        const h = m.host;
        y += 12;
        for (const [name, used, total, color] of [["host KV", h.kv_used, h.kv_blocks, COLORS.hostkv],
                                                  ["host act", h.act_used, h.act_blocks, COLORS.hostact]]) {
          ctx.fillStyle = "#445"; ctx.fillText(`${name}: ${used}/${total} blocks`, 0, y + 10);
          ctx.fillStyle = COLORS["."]; ctx.fillRect(140, y, w - 150, 14);
          ctx.fillStyle = color; ctx.fillRect(140, y, total ? (w - 150) * used / total : 0, 14);
          y += 22;
        }
      }
    } else if (kind === "slots" || kind === "slots_pages") {
      const rows = m.slots, rowH = Math.max(6, Math.min(18, Math.floor(600 / Math.max(rows.length, 1))));
      const [ctx, w] = setupCanvas(canvas, Math.min(rows.length * rowH + 4, 900));
      const seq = focusSeq();
      rows.forEach((r, i) => {
        const y = i * rowH, mine = seq !== null && String(r.seq) === seq;
        if (kind === "slots") {  // reserved max_model_len vs the tokens it holds
          ctx.fillStyle = r.seq === null ? COLORS["."] : mine ? "#fecaca" : COLORS.reserved;
          ctx.fillRect(0, y, w, rowH - 1);
          ctx.fillStyle = mine ? COLORS.highlight : COLORS.live;
          ctx.fillRect(0, y, w * r.live / m.slot_tokens, rowH - 1);
          cells.push({x: 0, y, w, h: rowH, label: `slot ${i}: ` + (r.seq === null ? "free" :
            `seq ${r.seq}, ${r.live} of ${m.slot_tokens} reserved tokens live`)});
        } else {  // one cell per chunk (page set): unmapped, mapped, shared
          const n = r.pages.length, cw = w / n;
          for (let j = 0; j < n; j++) {
            const c = r.pages[j];
            ctx.fillStyle = c === "." ? "#fff" : mine ? COLORS.highlight : c === "s" ? COLORS.s
              : r.seq === null ? COLORS.c : COLORS.m;
            ctx.fillRect(j * cw, y, Math.max(cw - (cw > 3 ? 1 : 0), 1), rowH - 1);
          }
          ctx.strokeStyle = "#ccd"; ctx.strokeRect(0.5, y + 0.5, w - 1, rowH - 2);
          ctx.fillStyle = "#000"; ctx.fillRect(0, y + rowH - 3, w * r.live / (n * m.chunk_tokens), 2);
          cells.push({x: 0, y, w, h: rowH, label: `slot ${i}: ` + (r.seq === null ? (r.cached ? "free, holds a cached prefix" : "free")
            : `seq ${r.seq}, ${r.live} tokens`) + `, ${(r.pages.match(/[ms]/g) || []).length} of ${n} chunks mapped`});
        }
      });
      if (kind === "slots") {
        legend([["free", "free slot"], ["reserved", "reserved"], ["live", "live tokens"], ["highlight", "selected request"]]);
        $("map-note").textContent = `${rows.length} slots of ${m.slot_tokens} tokens (${bytes(m.slot_bytes)}), one row each`;
      } else {
        legend([["unmapped", "unmapped"], ["mapped", "mapped"], ["shared", "shared"], ["cached", "free slot, cached"],
                ["highlight", "selected request"]]);
        $("map-note").textContent = `${rows.length} slots, one row each; a cell is a chunk of ${m.chunk_tokens} tokens ` +
          `(${bytes(m.chunk_bytes)}); ${m.counts.mapped} of ${m.counts.budget} chunks mapped`;
      }
    } else {
      const [ctx] = setupCanvas(canvas, 30);
      ctx.fillStyle = "#445"; ctx.fillText(`${m.strategy}: no per-block picture; see the numbers`, 4, 18);
      legend([]);
    }
  }

  function drawSeries(canvas, keys, colors, height) {
    const [ctx, w] = setupCanvas(canvas, height);
    if (history.length < 2) return;
    const t1 = history[history.length - 1].t, t0 = t1 - HISTORY_S;
    let max = 1;
    for (const p of history) for (const k of keys) max = Math.max(max, p[k]);
    ctx.strokeStyle = "#e5e7eb"; ctx.strokeRect(0.5, 0.5, w - 1, height - 1);
    keys.forEach((k, i) => {
      ctx.strokeStyle = colors[i]; ctx.lineWidth = 1.5; ctx.beginPath();
      history.forEach((p, j) => {
        const x = (p.t - t0) / HISTORY_S * (w - 2) + 1, y = height - 2 - p[k] / max * (height - 14);
        j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#667"; ctx.fillText(keys.includes("physical") ? bytes(max) : String(max), 4, 10);
  }

  let listKey = "";
  function renderRequests() {
    const m = state.map, ul = $("requests");
    const seqs = Object.keys(m.requests || {}).sort((a, b) => a - b);
    if (selected !== null && !seqs.includes(selected)) selected = null;
    if (hovered !== null && !seqs.includes(hovered)) hovered = null;
    const labels = seqs.map((seq) => {
      const n = m.owners && m.owners[seq] ? `${m.owners[seq].length} blocks` :
        m.tokens && m.tokens[seq] !== undefined ? `${m.tokens[seq]} tokens` : "";
      return `${m.requests[seq]} · seq ${seq}` + (n ? ` · ${n}` : "");
    });
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
    renderRequests();
    drawMap();
    drawSeries($("ts-bytes"), ["physical", "allocated", "live"], ["#64748b", "#3b82f6", "#16a34a"], 110);
    drawSeries($("ts-seqs"), ["running", "waiting"], ["#16a34a", "#f59e0b"], 80);
  }

  $("map").addEventListener("mousemove", (e) => {
    const r = e.target.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
    const c = cells.find((c) => x >= c.x && x < c.x + c.w && y >= c.y && y < c.y + c.h);
    $("hover").textContent = c ? c.label : "\u00a0";
  });
  window.addEventListener("resize", () => state && drawMap());

  let pending = null, scheduled = false;
  function onState(data) {
    pending = data;  // coalesced: only the newest state is drawn, once per frame
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      state = pending;
      const s = state.stats;
      history.push({t: state.time, physical: s.bytes_physical, allocated: s.bytes_allocated, live: s.bytes_live,
                    running: state.num_running, waiting: state.num_waiting});
      while (history.length && history[0].t < state.time - HISTORY_S) history.shift();
      render();
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    });
  }

  const source = new EventSource("/dashboard/events");
  source.onopen = () => { $("conn").textContent = "live"; };
  source.onerror = () => { $("conn").textContent = "disconnected, retrying…"; };
  source.onmessage = (e) => onState(JSON.parse(e.data));
})();
