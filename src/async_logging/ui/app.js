// async-logging viewer: plain JavaScript, no build step, no dependencies.
// Log data is shown with textContent only (never innerHTML): records come from clients.
// It needs ViewerFormat (format.js, loaded before it).
"use strict";

(function () {
  const API = "../api/";
  /** Rows the live tail keeps (older ones are removed). */
  const LIVE_ROWS = 200;
  /** How often the header's server status (the store's lag) is refreshed. */
  const STATUS_EVERY_MS = 5000;
  const FLAG_NAMES = ["late", "orphan", "missing_end", "missing_begin", "cycle", "depth_cut", "conflict"];

  // ------------------------------------------------------------------ helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "className") node.className = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key === "onclick") node.addEventListener("click", value);
        else if (key === "title") node.title = value;
        else node.setAttribute(key, value);
      }
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function appendAll(node, ...children) {
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  const fmtMs = ViewerFormat.duration;
  const fmtTime = ViewerFormat.time;

  function statusClass(status) {
    if (status === undefined || status === null) return "unknown";
    if (String(status) === "0") return "ok";
    if (String(status) === "-1") return "unknown";
    return "fail";
  }

  async function getJSON(path) {
    const resp = await fetch(API + path, { headers: { Accept: "application/json" } });
    if (resp.status === 401) {
      // The sign-in cookie expired (or the server restarted): the page shows the login form.
      location.reload();
      throw new Error("signed out");
    }
    let body;
    try {
      body = await resp.json();
    } catch (e) {
      throw new Error(`HTTP ${resp.status}`);
    }
    if (!resp.ok) throw new Error(body && body.detail ? body.detail : `HTTP ${resp.status}`);
    return body;
  }

  function flagsOf(tree) {
    // Flags found anywhere in a record (the live tail has no store row to tell them).
    const found = new Set();
    const stack = [tree];
    let nodes = 0;
    while (stack.length) {
      const node = stack.pop();
      nodes += 1;
      for (const f of FLAG_NAMES) if (node[f]) found.add(f);
      if (Array.isArray(node.children)) stack.push(...node.children);
    }
    return { flags: [...found].sort(), nodes };
  }

  function badges(row) {
    const out = [];
    if (row.kind === "transaction" && row.complete === false) {
      out.push(el("span", { className: "badge incomplete", title: "published incomplete" },
        "incomplete" + (row.reason ? ": " + row.reason : "")));
    }
    for (const f of row.flags || []) {
      out.push(el("span", { className: "badge " + (f === "late" ? "late" : "flag") }, f));
    }
    return out;
  }

  // A summary row (search result or live record) as a table row.
  function resultRow(row, onOpen) {
    const sc = statusClass(row.status);
    const tr = el("tr", { dataset: { kind: row.kind || "" } },
      el("td", { className: "time" }, fmtTime(row.ts)),
      el("td", { className: "kind" }, row.kind === "transaction" ? "tx" : row.kind === "heartbeat" ? "hb" : "event"),
      el("td", null, row.type || ""),
      el("td", { className: "name", title: row.name || "" }, row.name || ""),
      el("td", { className: "num" }, row.kind === "transaction" ? fmtMs(row.duration) : ""),
      el("td", { className: "st-" + sc }, row.status === null || row.status === undefined ? "" : String(row.status)),
      el("td", { className: "num" }, row.nodes === undefined ? "" : String(row.nodes)),
      el("td", null, ...badges(row)),
      el("td", { className: "uuid" }, row.uuid || ""));
    tr.addEventListener("click", () => {
      for (const other of tr.parentNode.querySelectorAll("tr.selected")) other.classList.remove("selected");
      tr.classList.add("selected");
      onOpen();
    });
    return tr;
  }

  // ------------------------------------------------------------------ tabs and the tree pane

  const tabs = document.querySelectorAll(".tab");
  const panels = document.querySelectorAll(".panel");
  const treePane = document.getElementById("tree-pane");
  let current = "search";
  // The tree each tab shows: the search's (a stored tree) and the live tail's (a streamed
  // record) are kept apart, so one never shows under the other's list.
  const shown = { search: null, live: null };

  function showTab(name) {
    current = name;
    for (const t of tabs) t.classList.toggle("active", t.dataset.tab === name);
    for (const p of panels) p.hidden = p.dataset.panel !== name;
    const entry = shown[name];
    if (entry) drawTree(entry.tree, entry.id, entry.extras);
    else treePane.hidden = true;
    if (name === "summary") loadSummary();
  }

  function showTree(tab, tree, id, extras) {
    shown[tab] = { tree, id, extras: extras || [] };
    if (current === tab) drawTree(tree, id, extras);
  }

  function closeTree(tab) {
    shown[tab] = null;
    if (current === tab) treePane.hidden = true;
  }

  // The address says what the page shows: the search in the query (shareable, and the back
  // button walks through searches), the tab or the search's open tree in the fragment.
  function go(query, hash) {
    const url = location.pathname + (query ? "?" + query : "") + hash;
    if (url !== location.pathname + location.search + location.hash) history.pushState(null, "", url);
  }

  for (const t of tabs) t.addEventListener("click", () => {
    const name = t.dataset.tab;
    const hash = name !== "search" ? "#" + name : shown.search && shown.search.id ? "#tree=" + shown.search.id : "";
    go(location.search.slice(1), hash);
    showTab(name);
  });

  // ------------------------------------------------------------------ the waterfall

  const waterfall = document.getElementById("waterfall");
  const treeHead = document.getElementById("tree-head");
  const detail = document.getElementById("detail");

  function flatten(tree) {
    const rows = [];
    const stack = [[tree, 0]];
    while (stack.length) {
      const [node, depth] = stack.pop();
      rows.push({ node, depth });
      const kids = Array.isArray(node.children) ? node.children : [];
      for (let i = kids.length - 1; i >= 0; i--) stack.push([kids[i], depth + 1]);
    }
    return rows;
  }

  // One value of the detail table: a timestamp as a date, a duration in its unit, each
  // with the number sent beside it.
  function detailCell(key, value) {
    if (key === "timestamp" && typeof value === "number") {
      return el("td", null, fmtTime(value), el("span", { className: "raw" }, String(value)));
    }
    if (key === "duration" && typeof value === "number") {
      const text = fmtMs(value);
      return el("td", null, text, text !== value + " ms" ? el("span", { className: "raw" }, value + " ms") : null);
    }
    return el("td", null, typeof value === "object" ? JSON.stringify(value) : String(value));
  }

  // What a compact record keeps below its root only where it differs (engine.COMPACT_KEYS).
  const INHERITED = ["uuid", "request", "tid", "pid", "machine", "ipAddress", "ip", "pool", "rlogid"];

  function showDetail(node, root) {
    clear(detail);
    for (const [key, value] of Object.entries(node)) {
      if (key === "children") continue;
      detail.append(el("tr", { dataset: { key } }, el("th", null, key), detailCell(key, value)));
    }
    // A compact record (--compact) leaves these out below the root: they are the root's.
    if (root && root !== node) {
      for (const key of INHERITED) {
        if (key in node || !(key in root)) continue;
        detail.append(el("tr", { dataset: { key }, className: "inherited", title: "left out below the root: the root's" },
          el("th", null, key), el("td", null, String(root[key]), el("span", { className: "raw" }, "the root's"))));
      }
    }
    if (Array.isArray(node.children)) {
      detail.append(el("tr", null, el("th", null, "children"), el("td", null, String(node.children.length))));
    }
  }

  function drawTree(tree, storedId, extras) {
    treePane.hidden = false;
    const rows = flatten(tree);
    for (const r of rows) r.root = tree;
    for (const extra of extras || []) {
      for (const r of flatten(extra)) {
        r.root = extra;
        rows.push(r);
      }
    }
    let t0 = Infinity;
    let t1 = -Infinity;
    for (const { node } of rows) {
      const ts = typeof node.timestamp === "number" ? node.timestamp : null;
      if (ts === null) continue;
      t0 = Math.min(t0, ts);
      const dur = node.kind === "transaction" && typeof node.duration === "number" ? node.duration : 0;
      t1 = Math.max(t1, ts + dur);
    }
    if (!Number.isFinite(t0)) { t0 = 0; t1 = 1; }
    const span = t1 > t0 ? t1 - t0 : 1; // a tree under 1 ms is drawn on its own scale (µs)

    // Header: what this tree is.
    clear(treeHead);
    const sc = statusClass(tree.status);
    const info = flagsOf(tree);
    appendAll(treeHead,
      el("span", { className: "title" }, `${tree.type || ""} ${tree.name || tree.msg || ""}`.trim() || "(unnamed)"),
      el("span", { className: "st-" + sc }, tree.status === undefined ? "" : `status ${tree.status}`),
      tree.kind === "transaction" ? el("span", { className: "meta" }, fmtMs(tree.duration)) : null,
      el("span", { className: "meta" }, fmtTime(tree.timestamp)),
      tree.uuid ? el("span", { className: "meta" }, "uuid " + tree.uuid) : null,
      el("span", { className: "meta" }, `${info.nodes} node${info.nodes === 1 ? "" : "s"}`),
      storedId ? el("span", { className: "meta" }, "#" + storedId) : null,
      ...badges({ kind: tree.kind, complete: tree.complete, reason: tree.reason, flags: info.flags }));

    // The axis.
    clear(waterfall);
    const axisTrack = el("div", { className: "wf-track" });
    for (let i = 0; i <= 4; i++) {
      const tick = el("span", { className: "wf-tick" + (i === 0 ? " first" : i === 4 ? " last" : "") }, fmtMs((span * i) / 4));
      tick.style.left = (i * 25) + "%";
      axisTrack.append(tick);
    }
    waterfall.append(el("div", { className: "wf-axis" }, el("div", { className: "wf-label" }, "transaction / event"), axisTrack));

    // One row per node, in tree order.
    for (const { node, depth, root } of rows) {
      const isTx = node.kind === "transaction";
      const label = el("div", { className: "wf-label", title: node.msg ? String(node.msg) : "" },
        el("span", { className: "twist" }, isTx && node.children && node.children.length ? "▾" : ""),
        el("span", { className: "type" }, node.type || node.kind || ""),
        el("span", { className: "name" }, node.name || (isTx ? "" : node.msg || "")),
        node.name && node.msg && !isTx ? el("span", { className: "msg" }, String(node.msg)) : null);
      label.style.paddingLeft = (8 + depth * 16) + "px";
      for (const f of FLAG_NAMES) {
        if (node[f]) label.append(" ", el("span", { className: "badge " + (f === "late" ? "late" : "flag") }, f));
      }
      if (isTx && node.complete === false && !node.missing_end) {
        label.append(" ", el("span", { className: "badge incomplete" }, "incomplete"));
      }
      const track = el("div", { className: "wf-track" });
      const ts = typeof node.timestamp === "number" ? node.timestamp : t0;
      const left = ((ts - t0) / span) * 100;
      if (isTx) {
        const dur = typeof node.duration === "number" ? node.duration : 0;
        const width = (dur / span) * 100;
        const bar = el("div", {
          className: `wf-bar ${statusClass(node.status)}${node.complete === false ? " incomplete" : ""}${left + width > 80 ? " right" : ""}`,
          title: `${node.type || ""} ${node.name || ""}: ${fmtMs(dur)}, status ${node.status}` +
            (node.complete === false ? " (incomplete)" : ""),
          dataset: { status: String(node.status) },
        }, el("span", { className: "wf-dur" }, fmtMs(dur)));
        bar.style.left = left + "%";
        bar.style.width = width + "%";
        track.append(bar);
      } else {
        const level = String(node.level || "").toUpperCase();
        const bad = level === "ERROR" || level === "FATAL" || level === "CRITICAL" ||
          (node.status !== undefined && statusClass(node.status) === "fail");
        const marker = el("div", {
          className: "wf-marker" + (bad ? " error" : level.startsWith("WARN") ? " warn" : "") + (node.late ? " late" : ""),
          title: `${node.type || ""} ${node.name || ""} ${node.msg || ""} @ +${fmtMs(ts - t0)}`.trim(),
        });
        marker.style.left = left + "%";
        track.append(marker);
      }
      const row = el("div", { className: "wf-row", dataset: { kind: node.kind || "", depth: String(depth) } }, label, track);
      row.addEventListener("click", () => {
        for (const other of waterfall.querySelectorAll(".wf-row.selected")) other.classList.remove("selected");
        row.classList.add("selected");
        showDetail(node, root);
      });
      waterfall.append(row);
    }
    showDetail(tree);
  }

  /** The id of the stored tree being fetched, if any. */
  let loading = null;

  // A stored tree for the search tab, with the records of its request stored apart.
  async function openStored(id) {
    loading = String(id);
    try {
      const body = await getJSON("tree/" + encodeURIComponent(id));
      let extras = [];
      if (body.record.uuid) {
        // Records of the same request stored apart (late events, fragments) join the picture.
        const q = new URLSearchParams({ uuid: String(body.record.uuid), limit: "200" });
        const same = await getJSON("search?" + q.toString());
        const others = same.results.filter((r) => r.id !== body.id).reverse();
        extras = await Promise.all(others.map((r) => getJSON("tree/" + r.id).then((b) => b.record)));
      }
      if (treeInAddress() !== String(id)) return; // the address moved on while it loaded
      showTree("search", body.record, body.id, extras);
    } catch (e) {
      note(resultsNote, "cannot load tree " + id + ": " + e.message, true);
    } finally {
      if (loading === String(id)) loading = null;
    }
  }

  function treeInAddress() {
    const hash = location.hash.replace(/^#/, "");
    return hash.startsWith("tree=") ? decodeURIComponent(hash.slice(5)) : null;
  }

  // ------------------------------------------------------------------ search

  const searchForm = document.getElementById("search-form");
  const resultsBody = document.querySelector("#results tbody");
  const resultsNote = document.getElementById("results-note");
  /** Text fields of the search as they appear in the address (defaults left out). */
  const SEARCH_FIELDS = ["uuid", "type", "name", "kind", "min_duration", "range", "limit"];
  const SEARCH_FLAGS = ["failures", "incomplete"];
  const SEARCH_DEFAULTS = { kind: "transaction", limit: "100" };
  /** The search last run (its address form), so that moving through history reruns only a changed one. */
  let lastSearch = null;

  function note(node, text, error) {
    node.textContent = text;
    node.classList.toggle("error", !!error);
  }

  function localMs(value) {
    if (!value) return null;
    const t = new Date(value).getTime();
    return Number.isFinite(t) ? t : null;
  }

  // Sorted, so that two spellings of one search compare equal.
  function canonical(params) {
    return new URLSearchParams([...params].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))).toString();
  }

  // The form as the address holds it: its fields, the flags as 1, the times in ms.
  function formToParams() {
    const f = new FormData(searchForm);
    const q = new URLSearchParams();
    for (const key of SEARCH_FIELDS) {
      const v = String(f.get(key) || "").trim();
      if (v && v !== SEARCH_DEFAULTS[key]) q.set(key, v);
    }
    for (const key of SEARCH_FLAGS) if (f.get(key)) q.set(key, "1");
    for (const key of ["since", "until"]) {
      const ms = localMs(f.get(key));
      if (ms !== null) q.set(key, String(ms));
    }
    return q;
  }

  // The address's search put back in the form (a bookmark, a shared link, the back button).
  function paramsToForm(q) {
    const fields = searchForm.elements;
    for (const key of SEARCH_FIELDS) {
      const input = fields.namedItem(key);
      const value = q.get(key) || SEARCH_DEFAULTS[key] || "";
      input.value = value;
      if (input.tagName === "SELECT" && input.value !== value) input.value = SEARCH_DEFAULTS[key] || "";
    }
    for (const key of SEARCH_FLAGS) fields.namedItem(key).checked = ["1", "true"].includes(q.get(key));
    for (const key of ["since", "until"]) {
      const ms = Number(q.get(key));
      fields.namedItem(key).value = q.get(key) && Number.isFinite(ms) ? ViewerFormat.inputTime(ms) : "";
    }
  }

  // The address's search as the API's query (a relative range counted from now).
  function apiParams(q) {
    const out = new URLSearchParams();
    for (const key of ["uuid", "type", "name", "min_duration"]) if (q.get(key)) out.set(key, q.get(key));
    const kind = q.get("kind") || SEARCH_DEFAULTS.kind;
    if (kind !== "any") out.set("kind", kind);
    out.set("limit", q.get("limit") || SEARCH_DEFAULTS.limit);
    for (const key of SEARCH_FLAGS) if (["1", "true"].includes(q.get(key))) out.set(key, "1");
    let since = q.get("since");
    if (!since && Number(q.get("range")) > 0) since = String(Date.now() - Number(q.get("range")) * 1000);
    if (since) out.set("since", since);
    if (q.get("until")) out.set("until", q.get("until"));
    return out;
  }

  async function search(q) {
    lastSearch = canonical(q);
    note(resultsNote, "searching…");
    try {
      const body = await getJSON("search?" + apiParams(q).toString());
      clear(resultsBody);
      for (const row of body.results) {
        resultsBody.append(resultRow(row, () => {
          go(location.search.slice(1), "#tree=" + encodeURIComponent(row.id));
          openStored(row.id);
        }));
      }
      const n = body.results.length;
      note(resultsNote, n === 0 ? "nothing matches" :
        `${n} record${n === 1 ? "" : "s"}, newest first` + (n >= body.limit ? ` (the first ${body.limit}; narrow the search for more)` : ""));
    } catch (e) {
      note(resultsNote, "search failed: " + e.message, true);
    }
  }

  searchForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = formToParams();
    if (canonical(q) !== canonical(new URLSearchParams(location.search))) {
      go(q.toString(), ""); // a new search: a new entry in the history, no tree open yet
      closeTree("search");
    }
    search(q);
  });

  // ------------------------------------------------------------------ live tail

  const liveForm = document.getElementById("live-form");
  const liveBody = document.querySelector("#live tbody");
  const liveNote = document.getElementById("live-note");
  const liveState = document.getElementById("live-state");
  const liveToggle = document.getElementById("live-toggle");
  let source = null;
  let received = 0;
  let dropped = 0;

  function liveStatus(text, cls) {
    liveState.textContent = text;
    liveState.className = "live-state " + cls;
  }

  function liveCounts() {
    note(liveNote, `${received} received` + (dropped ? `, ${dropped} dropped (this page fell behind)` : "") +
      `; the newest ${LIVE_ROWS} are kept`);
  }

  function stopLive() {
    if (source) source.close();
    source = null;
    liveToggle.textContent = "Start";
    liveStatus("stopped", "off");
  }

  function startLive() {
    const f = new FormData(liveForm);
    const q = new URLSearchParams();
    for (const key of ["type", "name", "min_duration"]) {
      const v = String(f.get(key) || "").trim();
      if (v) q.set(key, v);
    }
    if (f.get("transactions")) q.append("kind", "transaction");
    if (f.get("failures")) q.set("failures", "1");
    source = new EventSource(API + "live?" + q.toString());
    liveToggle.textContent = "Stop";
    liveStatus("connecting…", "off");
    source.addEventListener("open", () => liveStatus("live", "on"));
    source.addEventListener("error", () => {
      if (source && source.readyState === EventSource.CLOSED) {
        liveStatus("closed by the server", "error");
        serverStatus(); // a refused stream (signed out) brings the login form back
      } else {
        liveStatus("reconnecting…", "error");
      }
    });
    source.addEventListener("record", (ev) => {
      const record = JSON.parse(ev.data);
      const info = flagsOf(record);
      const row = {
        ts: record.timestamp, kind: record.kind, type: record.type, name: record.name,
        status: record.status, duration: record.duration, complete: record.complete,
        reason: record.reason, uuid: record.uuid, flags: info.flags, nodes: info.nodes,
      };
      received += 1;
      liveBody.prepend(resultRow(row, () => showTree("live", record, null)));
      while (liveBody.children.length > LIVE_ROWS) liveBody.removeChild(liveBody.lastChild);
      liveCounts();
    });
    source.addEventListener("dropped", (ev) => {
      dropped += JSON.parse(ev.data).dropped;
      liveCounts();
    });
  }

  liveForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (source) stopLive();
    else startLive();
  });
  document.getElementById("live-clear").addEventListener("click", () => {
    clear(liveBody);
    received = 0;
    dropped = 0;
    note(liveNote, "");
  });

  // ------------------------------------------------------------------ summary

  const summaryForm = document.getElementById("summary-form");
  const summaryBody = document.querySelector("#summary tbody");
  const summaryNote = document.getElementById("summary-note");

  function reportCells(r) {
    const rate = r.failure_rate * 100;
    return [
      el("td", { className: "num" }, r.count.toLocaleString()),
      el("td", { className: "num" }, r.failures.toLocaleString()),
      el("td", { className: "num" + (r.failures ? " rate-bad" : "") }, rate.toFixed(rate && rate < 1 ? 2 : 1) + " %"),
      el("td", { className: "num" }, fmtMs(r.avg)),
      el("td", { className: "num" }, fmtMs(r.p50)),
      el("td", { className: "num" }, fmtMs(r.p95)),
      el("td", { className: "num" }, fmtMs(r.max)),
    ];
  }

  async function loadSummary() {
    const f = new FormData(summaryForm);
    const q = new URLSearchParams({ window: String(f.get("window") || "3600") });
    const type = String(f.get("type") || "").trim();
    if (type) q.set("type", type);
    if (f.get("roots")) q.set("roots", "1");
    note(summaryNote, "loading…");
    try {
      const s = await getJSON("summary?" + q.toString());
      clear(summaryBody);
      for (const t of s.types) {
        summaryBody.append(el("tr", { className: "type-row" }, el("td", { className: "label" }, t.type || "(no type)"), ...reportCells(t)));
        for (const r of s.rows) {
          if (r.type !== t.type) continue;
          summaryBody.append(el("tr", { className: "name-row" }, el("td", { className: "label" }, r.name || "(no name)"), ...reportCells(r)));
        }
      }
      const parts = [`${s.spans.toLocaleString()} transactions from ${fmtTime(s.since)} to ${fmtTime(s.until)}`];
      if (s.sampled) parts.push("only the most recent were read");
      if (s.truncated) parts.push("only the busiest names are listed");
      if (!s.spans) parts.push("nothing in this window");
      note(summaryNote, parts.join("; "));
    } catch (e) {
      note(summaryNote, "summary failed: " + e.message, true);
    }
  }
  summaryForm.addEventListener("submit", (ev) => { ev.preventDefault(); loadSummary(); });

  // ------------------------------------------------------------------ start

  async function serverStatus() {
    const node = document.getElementById("server-status");
    try {
      const s = await getJSON("status");
      const parts = [];
      parts.push(s.store ? `store: ${s.store.records.toLocaleString()} records` : "store: off");
      const f = s.follower;
      let behind = false;
      if (f) {
        // The store follows the server's output: how far behind it is, now.
        behind = f.lag_records > 0 || !f.running || f.stalled;
        if (!f.running) parts.push("store follower: not running");
        else if (f.stalled) parts.push(`store follower: no report for ${f.status_age.toFixed(0)} s`);
        else if (f.lag_records > 0) {
          parts.push(`store lag: ${f.lag_records.toLocaleString()} records, ${f.lag_seconds.toFixed(1)} s`);
        } else parts.push("up to date");
      }
      parts.push(s.live.enabled ? "live: on" : "live: off (no store)");
      node.textContent = parts.join(" · ");
      node.classList.toggle("behind", behind);
    } catch (e) {
      node.textContent = "server: " + e.message;
    }
  }

  // Deep links, bookmarks and the back button: the page follows its address. The query is
  // the search (run again only when it changed); the fragment is the tab, or the search's
  // tree: #tree=ID opens a stored tree, #live starts the live tail, #summary.
  function route() {
    const q = new URLSearchParams(location.search);
    const changed = canonical(q) !== lastSearch;
    if (changed) paramsToForm(q);
    const hash = location.hash.replace(/^#/, "");
    let tab = "search";
    if (hash === "live" || hash === "summary") tab = hash;
    const id = treeInAddress();
    if (id !== null) {
      if ((!shown.search || String(shown.search.id) !== id) && loading !== id) {
        closeTree("search");
        openStored(id);
      }
    } else if (tab === "search") {
      closeTree("search");
    }
    showTab(tab);
    if (tab === "live" && !source) startLive();
    if (changed) search(q);
  }
  window.addEventListener("popstate", route);
  window.addEventListener("hashchange", route);
  route();
  serverStatus();
  setInterval(serverStatus, STATUS_EVERY_MS);
})();
