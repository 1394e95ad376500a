// The wirestate dashboard: vanilla JS, no dependencies, served by the hub itself.
//
// Reads /api/snapshot every second (counts, clients, rates, breakers, the event tail) and,
// between snapshots, follows the `clients`, `circuit_breaker` and `system_status` topics over
// its own WebSocket, so a connection, a disconnect or a breaker transition shows at once.
//
// The live part goes through wirestate.js, the hub's browser client (docs/client-js.md): it
// reconnects, resumes and keeps the connection alive; this page only renders what it gets.
//
// Every value from the server is rendered with textContent or as an SVG attribute, never as
// markup. With [auth] the snapshot answers 401: the page asks for a token, keeps it in
// sessionStorage, sends it as `Authorization: Bearer` and as `?token=` on the WebSocket.
import { connect } from "./wirestate.js";

(() => {
  const REFRESH_MS = 1000;
  const TOKEN_KEY = "wirestate.dashboard.token";
  const TOPICS = ["clients", "circuit_breaker", "system_status"];
  const CAUSES = [
    "peer_close", "read_error", "write_error", "keepalive_timeout", "slow_consumer",
    "message_too_big", "policy", "auth_expired", "shutdown",
  ];
  const TAIL = 30;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    authRequired: false,
    client: null, // the wirestate.js client, from the first good snapshot until a refusal
    myId: null,
    snapshot: null,
    refreshTimer: null,
    refreshing: false,
    waitingForToken: false,
    asked: 0, // when the snapshot on screen was requested
    liveTimer: null,
    diagramCount: 0,
    // Live facts newer than the last snapshot, merged into its rendering.
    gone: new Map(), // client id -> its `disconnected` event data (with the time seen)
    joined: new Map(), // client id -> time its `connected` event arrived
    liveEvents: [], // events received on the WebSocket since the snapshot
    breakerStates: new Map(), // breaker name -> state from a `circuit_breaker` event
    diagrams: new Map(), // breaker name -> its drawn SVG's node elements
  };

  // -- DOM helpers (text only; never innerHTML) ------------------------------------------

  const $ = (id) => document.getElementById(id);

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function s(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  const causeClass = (cause) => "cause-" + (CAUSES.includes(cause) ? cause : "other");
  const token = (value) => String(value).replace(/[^a-z0-9_]/gi, "_");

  // -- formatting ------------------------------------------------------------------------

  function fmtAge(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 60) return Math.floor(seconds) + " s";
    const m = Math.floor(seconds / 60);
    if (m < 60) return m + " m " + String(Math.floor(seconds % 60)).padStart(2, "0") + " s";
    const hours = Math.floor(m / 60);
    if (hours < 48) return hours + " h " + String(m % 60).padStart(2, "0") + " m";
    return Math.floor(hours / 24) + " d";
  }

  function fmtRtt(seconds) {
    if (typeof seconds !== "number") return "–";
    const ms = seconds * 1000;
    return (ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : Math.round(ms)) + " ms";
  }

  function fmtTime(iso) {
    const date = new Date(iso);
    if (isNaN(date.getTime())) return "–";
    return date.toLocaleTimeString([], { hour12: false }) +
      "." + String(date.getMilliseconds()).padStart(3, "0");
  }

  function fmtCount(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "–";
  }

  function fmtRate(rate) {
    if (typeof rate !== "number") return "–";
    return rate >= 100 ? Math.round(rate).toLocaleString("en-US") : rate.toFixed(rate < 10 ? 2 : 1);
  }

  function sum(counts) {
    return Object.values(counts || {}).reduce((a, b) => a + b, 0);
  }

  // -- the snapshot ----------------------------------------------------------------------

  function authHeaders() {
    return state.token ? { Authorization: "Bearer " + state.token } : {};
  }

  async function refresh() {
    if (state.refreshing) return;
    state.refreshing = true;
    const asked = Date.now();
    try {
      const response = await fetch("api/snapshot", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        let reason = "";
        try { reason = (await response.json()).message || ""; } catch (_) { /* fixed text only */ }
        needToken(state.token ? "The token was refused: " + reason : "");
        return; // no more polling until a token is entered
      }
      if (!response.ok) {
        setLink("error", "hub answered " + response.status);
        return;
      }
      const snap = await response.json();
      state.authRequired = state.authRequired || Boolean(state.token);
      hideAuth();
      render(snap, asked);
      if (!state.client) startLive();
    } catch (_) {
      setLink("offline", "offline");
    } finally {
      state.refreshing = false;
      if (!state.waitingForToken) scheduleRefresh(REFRESH_MS);
    }
  }

  function scheduleRefresh(delay) {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(refresh, delay);
  }

  // Live events trigger an early snapshot, debounced.
  function refreshSoon() {
    if (!state.refreshing && !state.waitingForToken) scheduleRefresh(150);
  }

  function render(snap, asked) {
    state.snapshot = snap;
    state.asked = asked;
    // Live facts older than this snapshot's request are in it now. Departed ids are kept a
    // while longer: a snapshot answered before the departure may still arrive.
    for (const [id, at] of state.joined) if (at < asked) state.joined.delete(id);
    for (const [id, d] of state.gone) if (d.seen < asked - 60000) state.gone.delete(id);
    state.liveEvents = state.liveEvents.filter((e) => e.seen >= asked);
    for (const [name, b] of state.breakerStates) if (b.seen < asked) state.breakerStates.delete(name);

    $("node").textContent = "node " + snap.epoch;
    renderBus(snap.bus);
    renderConnections(snap.connections);
    renderTotals(snap.totals);
    renderClients(snap.clients);
    renderDisconnects(snap.disconnects);
    renderBreakers(snap.breakers, snap.diagrams || {});
    renderTopics(snap.topics);
    renderEvents(snap.events);
    $("updated").textContent = "updated " + fmtTime(snap.now);
  }

  function renderBus(bus) {
    const el = $("bus");
    if (!bus) { el.hidden = true; return; }
    el.hidden = false;
    el.textContent = "bus " + bus.kind + (bus.up ? " up" : " down");
    el.dataset.state = bus.up ? "ok" : "bad";
  }

  function hiddenSection(node, text) {
    node.replaceChildren(h("p", { class: "muted small", text }));
  }

  function renderConnections(connections) {
    const tiles = $("conn-states");
    if (!connections) {
      $("conn-total").textContent = "–";
      hiddenSection(tiles, "Not visible with this token (needs the clients topic).");
      return;
    }
    $("conn-total").textContent = fmtCount(connections.total);
    const order = Object.keys(connections.states);
    tiles.replaceChildren(...order.map((name) => {
      const n = connections.states[name];
      return h("div", { class: "tile state-" + token(name) + (n ? "" : " zero"), "data-state": name },
        h("span", { class: "tile-value", text: fmtCount(n) }),
        h("span", { class: "tile-label", text: name.replace(/_/g, " ") }));
    }));
  }

  function renderTotals(totals) {
    const rows = [
      ["published", fmtCount(totals.published)],
      ["frames sent", fmtCount(totals.sent)],
      ["dropped", fmtCount(sum(totals.dropped)), breakdown(totals.dropped)],
      ["upgrades refused", fmtCount(sum(totals.refused)), breakdown(totals.refused)],
      ["aborted", fmtCount(totals.aborts)],
      ["loop stalls", fmtCount(totals.loop_stalls)],
    ];
    $("totals").replaceChildren(...rows.flatMap(([label, value, title]) => [
      h("dt", { text: label }), h("dd", { text: value, title: title || null }),
    ]));
  }

  function breakdown(counts) {
    const parts = Object.entries(counts || {}).map(([k, v]) => k + ": " + v);
    return parts.length ? parts.join(", ") : null;
  }

  function renderClients(clients) {
    const tbody = $("clients").tBodies[0];
    if (!clients) {
      $("clients-count").textContent = "–";
      replaceRows(tbody, []);
      $("clients-empty").hidden = false;
      $("clients-empty").textContent = "Not visible with this token (needs the clients topic).";
      return;
    }
    const rows = clients.rows.filter((c) => !state.gone.has(c.id));
    const known = new Set(rows.map((c) => c.id));
    for (const [id] of state.joined) {
      if (!known.has(id) && !state.gone.has(id)) {
        rows.unshift({ id, state: "open", age: 0, topics: [], outbox: 0, rtt: null, provisional: true });
      }
    }
    const total = clients.total - (clients.rows.length - rows.length);
    $("clients-count").textContent = clients.total > clients.shown
      ? fmtCount(rows.length) + " of " + fmtCount(total) : fmtCount(rows.length);
    $("clients-empty").hidden = rows.length > 0;
    $("clients-empty").textContent = "No clients connected.";
    replaceRows(tbody, rows.map(clientRow));
  }

  function clientRow(c) {
    const mine = c.id === state.myId;
    const topics = c.topics.join(", ");
    return h("tr", { "data-client-id": c.id, class: mine ? "mine" : null },
      h("td", { class: "mono" }, c.id, mine ? h("span", { class: "tag", text: "this page" }) : null),
      h("td", {}, h("span", { class: "badge state-" + token(c.state), text: c.state.replace(/_/g, " ") })),
      h("td", { class: "num", text: fmtAge(c.age) }),
      h("td", { class: "topics", title: topics || null, text: topics || "–" }),
      h("td", { class: "num" + (c.outbox ? " warn" : ""), text: fmtCount(c.outbox) }),
      h("td", { class: "num", text: fmtRtt(c.rtt) }));
  }

  function renderDisconnects(d) {
    const chips = $("disconnect-totals");
    if (!d) {
      hiddenSection(chips, "Not visible with this token (needs the clients topic).");
      $("disconnects").replaceChildren();
      $("timeline").replaceChildren();
      return;
    }
    // Live disconnects newer than the snapshot are added to its totals and list.
    const totals = Object.assign({}, d.totals);
    const recent = d.recent.slice();
    const timeline = d.timeline.map((bucket) => Object.assign({}, bucket));
    const latest = timeline[timeline.length - 1];
    const listed = new Set(recent.map((r) => r.client_id));
    for (const [id, ev] of state.gone) {
      if (!listed.has(id) && ev.seen >= state.asked) {
        recent.unshift(ev);
        totals[ev.cause] = (totals[ev.cause] || 0) + 1;
        if (latest) latest[ev.cause] = (latest[ev.cause] || 0) + 1;
      }
    }
    chips.replaceChildren(...Object.entries(totals).map(([cause, n]) =>
      h("span", { class: "chip " + causeClass(cause) + (n ? "" : " zero"), "data-cause": cause },
        h("i", { class: "swatch" }), cause.replace(/_/g, " "), h("b", { text: fmtCount(n) }))));
    drawTimeline($("timeline"), Object.assign({}, d, { timeline }));
    $("timeline-caption").textContent =
      "last " + Math.round(d.window / 60) + " minutes, " + d.bucket + " s buckets";
    $("disconnects-empty").hidden = recent.length > 0;
    $("disconnects").replaceChildren(...recent.slice(0, 12).map((r) =>
      h("li", { "data-client-id": r.client_id, "data-cause": r.cause },
        h("span", { class: "muted mono", text: r.ts ? fmtTime(r.ts) : "now" }),
        h("span", { class: "mono", text: r.client_id }),
        h("span", { class: "chip " + causeClass(r.cause) },
          h("i", { class: "swatch" }), r.cause),
        h("span", { class: "muted", text: (r.code === null || r.code === undefined ? "no code" : "code " + r.code) +
          (typeof r.duration === "number" ? " · after " + fmtAge(r.duration) : "") }))));
  }

  function drawTimeline(svg, d) {
    const W = 600, H = 110, top = 8, bottom = 18, left = 28;
    const buckets = d.timeline;
    const n = buckets.length;
    const max = Math.max(1, ...buckets.map(sum));
    const bw = (W - left) / n;
    const scale = (H - top - bottom) / max;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const nodes = [
      s("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" }),
      s("text", { x: left - 6, y: top + 8, class: "tick", "text-anchor": "end" }, max),
      s("text", { x: left - 6, y: H - bottom, class: "tick", "text-anchor": "end" }, 0),
      s("text", { x: left, y: H - 4, class: "tick" }, "−" + Math.round(d.window / 60) + " min"),
      s("text", { x: W, y: H - 4, class: "tick", "text-anchor": "end" }, "now"),
    ];
    buckets.forEach((counts, i) => {
      let y = H - bottom;
      const x = left + i * bw + 1;
      for (const cause of Object.keys(counts).sort()) {
        const hgt = counts[cause] * scale;
        y -= hgt;
        const rect = s("rect", { x, y, width: Math.max(1, bw - 2), height: hgt, class: "bar " + causeClass(cause) });
        const ago = (n - i) * d.bucket;
        rect.append(s("title", {}, `${counts[cause]} ${cause}, ${ago - d.bucket}–${ago} s ago`));
        nodes.push(rect);
      }
    });
    svg.replaceChildren(...nodes);
  }

  // -- breakers and their diagrams -------------------------------------------------------

  function renderBreakers(breakers, diagrams) {
    const box = $("breakers");
    if (!breakers) {
      hiddenSection(box, "Not visible with this token (needs the circuit_breaker topic).");
      return;
    }
    $("breakers-empty").hidden = breakers.length > 0;
    const seen = new Set();
    for (const b of breakers) {
      seen.add(b.name);
      let entry = state.diagrams.get(b.name);
      if (!entry) {
        entry = breakerCard(b, diagrams[b.diagram]);
        state.diagrams.set(b.name, entry);
        box.append(entry.card);
      }
      const live = state.breakerStates.get(b.name);
      updateBreaker(entry, b, live ? live.to : b.state);
    }
    for (const [name, entry] of state.diagrams) {
      if (!seen.has(name)) { entry.card.remove(); state.diagrams.delete(name); }
    }
  }

  function breakerCard(b, diagram) {
    const status = h("span", { class: "badge" });
    const detail = h("div", { class: "breaker-detail muted small" });
    const title = h("div", { class: "breaker-title" },
      h("strong", { class: "mono", text: b.name }),
      h("span", { class: "muted small", text: b.kind === "bus" ? "bus link" : "source " + b.topic }),
      status);
    const card = h("article", { class: "breaker", "data-breaker": b.name }, title);
    const nodes = new Map();
    if (diagram) {
      const svg = drawDiagram(diagram, nodes, "diagram" + state.diagramCount++);
      svg.setAttribute("aria-label", "state diagram of breaker " + b.name);
      card.append(svg);
    }
    card.append(detail);
    return { card, status, detail, nodes };
  }

  function updateBreaker(entry, b, current) {
    entry.card.dataset.state = current;
    entry.status.className = "badge state-" + token(current);
    entry.status.textContent = current.replace(/_/g, " ");
    for (const [id, node] of entry.nodes) {
      node.classList.toggle("current", id === current);
      node.setAttribute("aria-current", id === current ? "true" : "false");
    }
    const parts = [b.failures + " consecutive failure" + (b.failures === 1 ? "" : "s")];
    if (typeof b.retry_after === "number" && current === "open") parts.push("trial in " + fmtAge(b.retry_after));
    if (b.kind === "source") {
      parts.push(b.has_value ? "cached value " + fmtAge(b.age) + " old" : "no value yet");
      if (b.last_error) parts.push("last error " + b.last_error);
    }
    entry.detail.textContent = parts.join(" · ");
  }

  // A small renderer for the state diagrams the server describes: states on a grid, the
  // table's edges as straight or bent arrows (a pair of opposite edges bends apart).
  function drawDiagram(diagram, nodes, uid) {
    const NW = 104, NH = 28, CW = 168, CH = 78, PAD = 14;
    const width = PAD * 2 + NW + (diagram.columns - 1) * CW;
    const height = PAD * 2 + NH + (diagram.rows - 1) * CH;
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "diagram", role: "img" });
    const pos = new Map(diagram.states.map((st) =>
      [st.id, { x: PAD + NW / 2 + st.col * CW, y: PAD + NH / 2 + st.row * CH }]));
    const defs = s("defs");
    for (const kind of ["auto", "manual"]) {
      const marker = s("marker", {
        id: `${uid}-${kind}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
        markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse", class: "arrow-" + kind,
      });
      marker.append(s("path", { d: "M0,0 L10,5 L0,10 z" }));
      defs.append(marker);
    }
    svg.append(defs);
    const pairs = new Set(diagram.edges.map((e) => e.from + ">" + e.to));
    const edgeLayer = s("g", { class: "edges" });
    const labelLayer = s("g", { class: "labels" });
    for (const e of diagram.edges) {
      const a = pos.get(e.from), b = pos.get(e.to);
      if (!a || !b) continue;
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
      const nx = -dy / len, ny = dx / len; // the left-hand normal of the edge's direction
      const bend = pairs.has(e.to + ">" + e.from) ? 10 : 0;
      const cx = (a.x + b.x) / 2 + nx * bend * 2, cy = (a.y + b.y) / 2 + ny * bend * 2;
      const p0 = clip(a, bend ? { x: cx, y: cy } : b, NW, NH, 0);
      const p1 = clip(b, bend ? { x: cx, y: cy } : a, NW, NH, 2);
      const d = bend ? `M${p0.x},${p0.y} Q${cx},${cy} ${p1.x},${p1.y}` : `M${p0.x},${p0.y} L${p1.x},${p1.y}`;
      const kind = e.manual ? "manual" : "auto";
      const path = s("path", {
        d, class: "edge " + kind, "marker-end": `url(#${uid}-${kind})`,
        "data-from": e.from, "data-to": e.to,
      });
      path.append(s("title", {}, `${e.from} → ${e.to}: ${e.label}`));
      edgeLayer.append(path);
      if (!e.manual && e.short) {
        const mx = (a.x + b.x) / 2 + nx * (bend + 9), my = (a.y + b.y) / 2 + ny * (bend + 9);
        labelLayer.append(s("text", { x: mx, y: my + 3, class: "edge-label", "text-anchor": "middle" }, e.short));
      }
    }
    svg.append(edgeLayer);
    const nodeLayer = s("g", { class: "nodes" });
    for (const st of diagram.states) {
      const p = pos.get(st.id);
      const g = s("g", { class: "node state-" + token(st.id), "data-state": st.id });
      g.append(s("rect", { x: p.x - NW / 2, y: p.y - NH / 2, width: NW, height: NH, rx: 7 }));
      g.append(s("text", { x: p.x, y: p.y + 4, "text-anchor": "middle" }, st.id.replace(/_/g, " ")));
      g.append(s("title", {}, st.id + (st.id === diagram.initial ? " (initial)" : "")));
      nodeLayer.append(g);
      nodes.set(st.id, g);
    }
    svg.append(nodeLayer, labelLayer);
    return svg;
  }

  // Where the segment from the centre of a w×h box toward `toward` leaves the box (plus gap).
  function clip(c, toward, w, h, gap) {
    const dx = toward.x - c.x, dy = toward.y - c.y;
    const t = Math.min(dx ? (w / 2) / Math.abs(dx) : Infinity, dy ? (h / 2) / Math.abs(dy) : Infinity);
    const len = Math.hypot(dx, dy) || 1;
    return { x: c.x + dx * t + (dx / len) * gap, y: c.y + dy * t + (dy / len) * gap };
  }

  // -- topics and events -----------------------------------------------------------------

  function renderTopics(topics) {
    $("topics-count").textContent = topics.total > topics.shown
      ? topics.shown + " of " + fmtCount(topics.total) : fmtCount(topics.total);
    replaceRows($("topics").tBodies[0], topics.rows.map((t) =>
      h("tr", { "data-topic": t.name },
        h("td", { class: "mono", title: "epoch " + t.epoch + " · overflow " + t.policy, text: t.name }),
        h("td", { class: "num mono", text: fmtCount(t.seq) }),
        h("td", { class: "num", text: fmtRate(t.rate) }),
        h("td", { class: "num", text: fmtCount(t.subscribers) }),
        h("td", { class: "num muted", text: t.last_age === null ? "–" : fmtAge(t.last_age) + " ago" }))));
  }

  function renderEvents(events) {
    const seen = new Set(events.map((e) => e.topic + "#" + e.seq));
    const live = state.liveEvents.filter((e) => !seen.has(e.topic + "#" + e.seq));
    const rows = live.concat(events)
      .sort((a, b) => (a.ts < b.ts ? 1 : a.ts > b.ts ? -1 : 0))
      .slice(0, TAIL);
    replaceRows($("events").tBodies[0], rows.map((e) =>
      h("tr", { "data-topic": e.topic, "data-seq": e.seq },
        h("td", { class: "mono muted", text: fmtTime(e.ts) }),
        h("td", { class: "mono", text: e.topic }),
        h("td", { class: "num mono", text: e.seq }),
        h("td", { class: "data mono", title: e.data },
          e.stale ? h("span", { class: "tag stale", text: "stale" }) : null, e.data))));
  }

  function preview(data) {
    const text = JSON.stringify(data);
    return text.length > 240 ? text.slice(0, 239) + "…" : text;
  }

  // -- live events, through wirestate.js -------------------------------------------------

  function startLive() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    // Asked on every (re)connect: a token entered later is used by the next attempt.
    const client = connect(url, { getToken: () => state.token || null });
    state.client = client;
    let refusal = null;
    setLink("connecting", "connecting");
    client.on("state", (now) => {
      if (state.client !== client) return;
      if (now === "open") {
        state.myId = client.clientId;
        setLink("live", "live");
      } else if (now === "reconnecting") {
        state.myId = null;
        setLink("offline", "reconnecting");
      } else if (now === "closed") { // a refusal that retrying cannot heal: said just before
        state.myId = null;
        setLink("offline", "refused (" + (refusal || "closed") + ")");
      }
    });
    client.on("error", (err) => {
      if (state.client !== client) return;
      if (err.code === "unauthorized" || err.code === "auth_expired") {
        stopLive();
        needToken("The token was refused by the WebSocket endpoint.");
      } else {
        refusal = err.code;
        if (client.state === "open") setLink("live", "live · " + err.code);
      }
    });
    // One subscription per topic: a token without one of them still gets the others.
    for (const topic of TOPICS) client.subscribe(topic, { event: onEvent });
  }

  function stopLive() {
    const client = state.client;
    state.client = null;
    state.myId = null;
    if (client) client.close();
  }

  function onEvent(msg) {
    const now = Date.now();
    const data = msg.data || {};
    if (msg.topic === "clients" && data.client_id) {
      if (data.event === "connected") {
        state.joined.set(data.client_id, now);
      } else if (data.event === "disconnected") {
        state.joined.delete(data.client_id);
        state.gone.set(data.client_id, {
          client_id: data.client_id, cause: data.cause || "unknown", code: data.code,
          duration: data.duration, ts: msg.ts, seen: now,
        });
        if (state.gone.size > 5000) state.gone.delete(state.gone.keys().next().value);
      }
    } else if (msg.topic === "circuit_breaker" && data.breaker) {
      state.breakerStates.set(data.breaker, { to: data.to, seen: now });
    } else if (msg.topic === "system_status") {
      renderHost(data, msg.stale);
    }
    state.liveEvents.unshift({
      topic: msg.topic, seq: msg.seq, ts: msg.ts, stale: Boolean(msg.stale),
      data: preview(msg.data), seen: now,
    });
    state.liveEvents.length = Math.min(state.liveEvents.length, TAIL);
    scheduleLiveRender();
    refreshSoon();
  }

  // Show live events at once from what is known (coalesced: a burst renders once); the
  // early snapshot fills in the rest.
  function scheduleLiveRender() {
    if (state.liveTimer !== null || !state.snapshot) return;
    state.liveTimer = setTimeout(() => {
      state.liveTimer = null;
      const snap = state.snapshot;
      renderClients(snap.clients);
      renderDisconnects(snap.disconnects);
      renderBreakers(snap.breakers, snap.diagrams || {});
      renderEvents(snap.events);
    }, 30);
  }

  function renderHost(data, stale) {
    const parts = [];
    if (data.cpu && typeof data.cpu.percent === "number") parts.push("cpu " + data.cpu.percent.toFixed(0) + "%");
    if (data.memory && typeof data.memory.percent === "number") parts.push("mem " + data.memory.percent.toFixed(0) + "%");
    if (data.load && typeof data.load["1m"] === "number") parts.push("load " + data.load["1m"].toFixed(2));
    $("host").textContent = parts.join(" · ") + (stale ? " (stale)" : "");
  }

  function setLink(kind, text) {
    const el = $("link");
    el.dataset.state = kind;
    el.textContent = text;
  }

  // -- the token -------------------------------------------------------------------------

  function needToken(reason) {
    state.authRequired = true;
    state.waitingForToken = true;
    clearTimeout(state.refreshTimer);
    $("auth").hidden = false;
    $("main").classList.add("blurred");
    $("auth-reason").textContent = reason || "This hub requires a token to show its state.";
    $("token-button").hidden = false;
    setLink("offline", "token required");
    stopLive();
    $("token").focus();
  }

  function hideAuth() {
    $("auth").hidden = true;
    $("main").classList.remove("blurred");
    $("token-button").hidden = !state.authRequired;
  }

  function start() {
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.token = $("token").value.trim();
      $("token").value = "";
      sessionStorage.setItem(TOKEN_KEY, state.token);
      state.waitingForToken = false;
      stopLive();
      scheduleRefresh(0);
    });
    $("token-button").addEventListener("click", () => needToken("Enter another token."));
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
