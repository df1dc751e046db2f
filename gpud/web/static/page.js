// gpud status page: keeps the server-rendered page live. No framework, no build step.
// Sources: the SSE stream /api/v1/events (what happened) and /api/v1/status (what is).
// Every value goes into the DOM as text (textContent, setAttribute), never as markup.
(() => {
  "use strict";

  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#e15759",
    "#9c755f", "#ff9da7", "#86bcb6"];
  const LOG_LINES = 300;

  const body = document.body;
  // The state lists come from the server (gpud/states.py is their one source).
  const TRANSITIONAL = (body.dataset.transitional || "").split(" ").filter(Boolean);
  const ACTIONS = JSON.parse(body.dataset.actions || "{}");
  const admin = body.dataset.admin === "1";
  let lastSeq = Number(body.dataset.seq || 0);
  let logModel = null;
  // Times are shown on the schedule's wall clock (the daemon's zone), not the browser's.
  const clock = (() => {
    const opts = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };
    try { return new Intl.DateTimeFormat("en-GB", { ...opts, timeZone: body.dataset.tz || undefined }); }
    catch (err) { return new Intl.DateTimeFormat("en-GB", opts); }
  })();
  const hms = (ms) => clock.format(new Date(ms));

  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "style") node.style.cssText = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === "") continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // --- the same helpers as gpud/web/page.py -----------------------------------------------
  function humanBytes(n) {
    if (n === null || n === undefined) return "–";
    let v = Number(n);
    for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
      if (Math.abs(v) < 1024 || unit === "TiB") {
        return (unit === "B" || unit === "KiB") ? `${Math.round(v)} ${unit}` : `${v.toFixed(1)} ${unit}`;
      }
      v /= 1024;
    }
    return `${v.toFixed(1)} TiB`;
  }

  function humanDuration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function modelColours(models) {
    const names = [...new Set(Object.values(models).map((m) => m.model))].sort();
    const out = {};
    names.forEach((n, i) => { out[n] = PALETTE[i % PALETTE.length]; });
    return out;
  }

  function describeEvent(e) {
    const dur = e.duration;
    const took = typeof dur === "number" ? ` in ${dur}s` : "";
    switch (e.kind) {
      case "action": {
        let t = `${e.action} ${e.ok ? "done" : "failed"}${took}`;
        if (e.reason) t += ` · ${e.reason}`;
        if (!e.ok && e.error) t += ` · ${e.error}`;
        return t;
      }
      case "woke": case "slept": return `level ${e.level}${took}`;
      case "loaded": return `healthy after ${dur}s`;
      case "config":
        return e.valid ? `reloaded (${e.source}): revision ${e.previous} → ${e.revision}`
          : `reload refused (${e.source}): ${e.error}`;
      case "profile": return `profile ${e.profile || "(schedule)"} · ${e.reason || ""}`;
      case "phase": return `${e.previous} took ${e.seconds}s, now ${e.phase} (${e.elapsed}s in all)`;
      case "crashed": return `pid ${e.pid}: ${e.cause} ${e.detail || ""}`.trim();
      default: return ["state", "reason", "error"].filter((k) => e[k]).map((k) => String(e[k])).join(" · ");
    }
  }

  function modelBytes(memory) {
    const out = {};
    const gpus = (memory && memory.gpus) || [];
    for (const g of gpus) for (const [k, v] of Object.entries(g.models || {})) out[k] = (out[k] || 0) + v;
    if (!gpus.length && memory && memory.host) {
      for (const [k, e] of Object.entries(memory.host.engines || {})) out[k] = e.rss;
    }
    return out;
  }

  // --- models -----------------------------------------------------------------------------
  function elapsed(seconds) {  // 12s, 3m05s: as gpud/web/page.py and `gpud status` write it
    const s = Math.round(Math.max(0, seconds || 0));
    return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  }

  // Under a starting model's state: its load phase and time, the phases before with theirs,
  // the engine's last log line; under another moving state, its time so far.
  function progress(m) {
    if (m.phase) {
      const item = (p, s, cls) => el("li", { class: cls }, p, " ", el("span", { class: "t" }, elapsed(s)));
      return [el("ol", { class: "phases" }, (m.phases || []).map((p) => item(p.phase, p.seconds)),
        item(m.phase, m.phase_seconds, "current")),
      m.log_line ? el("div", { class: "sub logline" }, m.log_line) : null];
    }
    if (TRANSITIONAL.includes(m.state) && m.state_seconds !== null && m.state_seconds !== undefined) {
      return [" ", el("span", { class: "sub t" }, elapsed(m.state_seconds))];
    }
    return null;
  }

  function statePill(state) {
    const moving = TRANSITIONAL.includes(state) ? " moving" : "";
    return el("span", { class: `state state-${state}${moving}` }, state);
  }

  function buttons(m, state) {
    if (m.replica) return [el("span", { class: "sub" }, "see replica 0")];
    return (ACTIONS[state] || ["unload"]).map((verb) =>
      el("form", { method: "post", class: "act", action: `/api/v1/models/${encodeURIComponent(m.model)}/${verb}` },
        el("button", { type: "submit", class: `btn btn-${verb}`, "data-verb": verb, "data-model": m.model }, verb)));
  }

  function modelRow(key, m, colour, mem) {
    const state = m.state || "unloaded";
    const where = m.gpu === null || m.gpu === undefined ? "cpu" : `gpu ${m.gpu}`;
    const rules = m.rules || [];
    const sub = [where, m.port ? `port ${m.port}` : "", m.restarts ? `${m.restarts} restarts` : "",
      rules.length ? `${rules.length} request rule${rules.length > 1 ? "s" : ""}` : "",
      m.routing === "prefix" ? "prefix routing" : ""]
      .filter(Boolean).join(" · ");
    const showError = m.last_error && !(m.reason || "").includes(m.last_error);
    const cell = (label, cls, title, ...inner) =>
      el("td", { "data-label": label, class: cls, title }, el("div", { class: "v" }, ...inner));
    const cells = [
      cell("Model", "name", rules.length ? rules.join("\n") : null, el("span", { class: "dot", style: `background:${colour}` }),
        el("strong", {}, key), el("div", { class: "sub" }, sub)),
      cell("State", "st", null, statePill(state),
        m.desired && m.desired !== state ? [" ", el("span", { class: "goal", title: "desired state" }, `→ ${m.desired}`)] : null,
        progress(m)),
      cell("Why", "reason", null, m.reason || "", m.layer ? el("span", { class: "layer" }, m.layer) : null,
        showError ? el("div", { class: "error" }, m.last_error) : null),
      cell("Up", "up", `state since ${m.state_since || ""}`,
        m.uptime_seconds === null || m.uptime_seconds === undefined ? "–" : humanDuration(m.uptime_seconds)),
      cell("In flight", "flight", "in flight / queued", `${m.inflight || 0} / ${m.queued || 0}`),
      cell("Memory", "mem", null, mem ? humanBytes(mem) : "–"),
    ];
    if (admin) cells.push(cell("Actions", "actions", null, buttons(m, state)));
    return el("tr", { "data-key": key, "data-model": m.model || key, class: `row-${state}` }, cells);
  }

  function renderModels(status) {
    const target = $("#models-body");
    const models = status.models || {};
    const keys = Object.keys(models);
    if (!keys.length) {
      target.replaceChildren(el("p", { class: "empty" }, "No models are configured. Describe one under ",
        el("code", {}, "[models.NAME]"), " in the config file; ", el("code", {}, "gpud check"), " validates it."));
      return;
    }
    const colours = modelColours(models);
    const mem = modelBytes(status.memory);
    const head = ["Model", "State", "Why", "Up", "In flight", "Memory"].concat(admin ? ["Actions"] : []);
    target.replaceChildren(el("table", { class: "models" },
      el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, keys.map((k) => modelRow(k, models[k], colours[models[k].model], mem[k])))));
  }

  // --- memory -----------------------------------------------------------------------------
  function seg(value, total, colour, title) {
    const pct = Math.max(0, Math.min(100, (100 * (value || 0)) / total));
    return pct > 0 ? el("span", { class: "seg", style: `width:${pct.toFixed(2)}%;background:${colour}`, title }) : null;
  }

  function legend(colour, label, value) {
    return el("li", {}, el("span", { class: "dot", style: `background:${colour}` }), label, " ",
      el("span", { class: "sub" }, humanBytes(value)));
  }

  function renderMemory(status) {
    const memory = status.memory;
    if (!memory) return;
    const models = status.models || {};
    const colours = modelColours(models);
    const keyColour = (k) => (models[k] ? colours[models[k].model] : "#888");
    const parts = [];
    for (const g of memory.gpus || []) {
      const total = Math.max(1, g.total);
      const segs = [], leg = [];
      for (const k of Object.keys(g.models || {}).sort()) {
        segs.push(seg(g.models[k], total, keyColour(k), `${k}: ${humanBytes(g.models[k])}`));
        leg.push(legend(keyColour(k), k, g.models[k]));
      }
      segs.push(seg(g.other, total, "var(--other)", `other processes: ${humanBytes(g.other)}`));
      leg.push(legend("var(--other)", "other", g.other), legend("var(--free)", "free", g.free));
      parts.push(el("div", { class: "gpu" },
        el("div", { class: "gpu-head" }, el("strong", {}, `GPU ${g.index}`), " ",
          el("span", { class: "sub" }, `${g.name} · ${humanBytes(g.used)} of ${humanBytes(g.total)} used`)),
        el("div", { class: "bar" }, segs), el("ul", { class: "legend" }, leg)));
    }
    if (!(memory.gpus || []).length) {
      const host = memory.host || {};
      const total = Math.max(1, host.total || 1);
      const engines = host.engines || {};
      const segs = [], leg = [];
      let sum = 0;
      for (const k of Object.keys(engines).sort()) {
        sum += engines[k].rss;
        segs.push(seg(engines[k].rss, total, keyColour(k), `${k}: ${humanBytes(engines[k].rss)} RSS`));
        leg.push(legend(keyColour(k), k, engines[k].rss));
      }
      const others = Math.max(0, total - (host.available || 0) - sum);
      segs.push(seg(others, total, "var(--other)", "everything else"));
      leg.push(legend("var(--other)", "other", others), legend("var(--free)", "available", host.available));
      parts.push(el("p", { class: "nogpu" }, el("strong", {}, memory.note || "no GPU"),
        ": GPU memory cannot be shown on this machine. Host memory (resident set of each engine's processes):"));
      parts.push(el("div", { class: "gpu" },
        el("div", { class: "gpu-head" }, el("strong", {}, "Host"), " ",
          el("span", { class: "sub" }, `${humanBytes(host.total)} total`)),
        el("div", { class: "bar" }, segs), el("ul", { class: "legend" }, leg)));
    }
    $("#memory-body").replaceChildren(...parts);
  }

  // --- header, schedule ---------------------------------------------------------------------
  function renderHeader(status) {
    $("#hdr-profile").textContent = status.profile || "none";
    $("#hdr-config").textContent = status.config ? status.config.revision : "";
  }

  async function refreshSchedule() {
    // The day's segments are computed by the server: take its fresh rendering of the section.
    try {
      const resp = await fetch(location.pathname, { cache: "no-store" });
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.querySelector("#schedule-body");
      if (fresh) $("#schedule-body").replaceWith(document.importNode(fresh, true));
    } catch (err) { /* the next event or tick tries again */ }
  }

  function tickNow() {
    const tl = $(".timeline");
    if (!tl) return;
    const start = Date.parse(tl.dataset.start), end = Date.parse(tl.dataset.end), now = Date.now();
    if (now >= end) { refreshSchedule(); return; }
    const mark = $(".now", tl);
    if (mark) {
      mark.style.left = `${Math.max(0, Math.min(100, (100 * (now - start)) / (end - start))).toFixed(3)}%`;
      const span = $("span", mark);
      if (span) span.textContent = `now ${hms(now).slice(0, 5)}`;
    }
    const cd = $("[data-countdown]");
    if (cd) {
      const left = (Date.parse(cd.dataset.countdown) - now) / 1000;
      if (left <= 0) refreshSchedule(); else cd.textContent = `in ${humanDuration(left)}`;
    }
  }

  // --- status refresh -----------------------------------------------------------------------
  let refreshing = false, again = false, timer = null;
  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const resp = await fetch("/api/v1/status", { cache: "no-store" });
      if (resp.ok) {
        const status = await resp.json();
        renderHeader(status);
        renderModels(status);
        renderMemory(status);
        if (!logModel) pickDefaultLog(status);
        // while a model moves, its phase and time go on: read again each second
        if (Object.values(status.models || {}).some((m) => TRANSITIONAL.includes(m.state))) {
          clearTimeout(timer); timer = setTimeout(refresh, 1000);
        }
      }
    } catch (err) { /* offline for a moment: the next event or tick tries again */ }
    refreshing = false;
    if (again) { again = false; refresh(); }
  }
  function soon() { clearTimeout(timer); timer = setTimeout(refresh, 150); }

  // --- events -----------------------------------------------------------------------------
  function addEvent(e) {
    const list = $("#events-body ol.events");
    if (!list) return;
    const empty = $(".empty", list);
    if (empty) empty.remove();
    const hh = hms(e.time * 1000);
    const bad = e.kind === "failed" || e.kind === "crashed" || e.ok === false || e.valid === false;
    list.prepend(el("li", { class: `ev fresh${bad ? " bad" : ""}`, "data-seq": e.seq },
      el("time", {}, hh), el("span", { class: "kind" }, e.kind), el("span", { class: "who" }, e.model || ""),
      el("span", { class: "what" }, describeEvent(e))));
    while (list.children.length > 100) list.lastElementChild.remove();
  }

  function connect() {
    if (!window.EventSource) { setInterval(refresh, 5000); return; }
    const live = $("#live");
    const es = new EventSource(`/api/v1/events?since=${lastSeq}`);
    es.onopen = () => { live.classList.add("on"); $("span", live).textContent = "live"; refresh(); };
    es.onerror = () => { live.classList.remove("on"); $("span", live).textContent = "reconnecting"; };
    es.onmessage = (msg) => {
      let e;
      try { e = JSON.parse(msg.data); } catch (err) { return; }
      if (typeof e.seq === "number") {
        if (e.seq <= lastSeq) return;  // a reconnect replays the history
        lastSeq = e.seq;
      }
      addEvent(e);
      soon();
      if (e.kind === "profile" || e.kind === "config") refreshSchedule();
    };
  }

  // --- actions ----------------------------------------------------------------------------
  let toastTimer = null;
  function toast(text, bad) {
    const t = $("#toast");
    t.textContent = text;
    t.className = `show${bad ? " bad" : ""}`;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.className = ""; }, 3500);
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("act")) return;
    ev.preventDefault();
    const button = $("button", form);
    if (button) button.disabled = true;
    try {
      const resp = await fetch(form.action, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      const data = await resp.json().catch(() => ({}));
      if (resp.ok) toast(data.message || "ok", false);
      else toast((data.error && data.error.message) || `HTTP ${resp.status}`, true);
    } catch (err) {
      toast(`cannot reach gpud: ${err}`, true);
    }
    soon();
  });

  // --- logs -------------------------------------------------------------------------------
  function selectLog(key) {
    logModel = key;
    for (const a of document.querySelectorAll(".tabs .tab")) a.classList.toggle("on", a.dataset.log === key);
    const pre = $("#log");
    if (pre) pre.dataset.model = key;
    pollLog();
  }

  function pickDefaultLog(status) {
    const keys = Object.keys(status.models || {});
    const pre = $("#log");
    if (pre && pre.dataset.model) { selectLog(pre.dataset.model); return; }
    if (keys.length) selectLog(keys[0]);
  }

  async function pollLog() {
    const pre = $("#log");
    if (!pre || !logModel || document.hidden) return;
    const key = logModel;
    try {
      const resp = await fetch(`/api/v1/models/${encodeURIComponent(key)}/logs?lines=${LOG_LINES}`, { cache: "no-store" });
      if (!resp.ok || key !== logModel) return;
      const data = await resp.json();
      const follow = $("#follow");
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
      const text = (data.lines || []).join("\n") || "(the log is empty)";
      if (pre.textContent !== text) pre.textContent = text;
      if ((follow && follow.checked) || atBottom) pre.scrollTop = pre.scrollHeight;
    } catch (err) { /* next poll */ }
  }

  document.addEventListener("click", (ev) => {
    const a = ev.target instanceof Element ? ev.target.closest(".tabs .tab") : null;
    if (!a) return;
    ev.preventDefault();
    history.replaceState(null, "", `?log=${encodeURIComponent(a.dataset.log)}#logs`);
    selectLog(a.dataset.log);
  });

  // --- start ------------------------------------------------------------------------------
  const pre = $("#log");
  if (pre) pre.scrollTop = pre.scrollHeight;
  connect();
  setInterval(refresh, 10000);
  setInterval(tickNow, 15000);
  setInterval(pollLog, 2000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) { refresh(); pollLog(); } });
  tickNow();
})();
