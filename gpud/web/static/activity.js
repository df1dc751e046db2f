// The page's tabs, the Activity table (from /api/v1/activity) and the Playground (gpud's own
// /v1/chat/completions, streamed). Values go into the DOM as text, never as markup.
(() => {
  "use strict";
  const $ = (sel, root = document) => root.querySelector(sel);
  const TABS = ["overview", "activity", "playground"];
  const ACTIVITY_ROWS = 50;
  const clock = new Intl.DateTimeFormat("en-GB", {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    timeZone: document.body.dataset.tz || undefined,
  });

  // --- tabs ---------------------------------------------------------------------------------
  function showTab() {
    const want = location.hash.slice(1);
    const tab = TABS.includes(want) ? want : "overview";
    document.body.dataset.tab = tab;
    for (const a of document.querySelectorAll(".pagetabs .ptab")) a.classList.toggle("on", a.dataset.tab === tab);
    if (tab === "activity") refreshActivity();
  }
  window.addEventListener("hashchange", showTab);

  // --- activity -----------------------------------------------------------------------------
  const ms = (s) => (s === null || s === undefined ? "–" : `${Math.round(s * 1000)} ms`);
  // The same cells as gpud/web/page_activity.py's activity_cells().
  function cells(r) {
    const model = (r.model || "–") + (r.asked ? ` (${r.asked})` : "");
    const none = r.tokens_in === null && r.tokens_out === null;
    const tokens = none ? "–" : `${r.tokens_in || 0} → ${r.tokens_out || 0}`;
    return [clock.format(new Date(r.at * 1000)), model, r.key || "–",
      `${r.endpoint}${r.stream ? " · stream" : ""}`, String(r.status), ms(r.ttft), ms(r.duration), tokens];
  }

  let polling = false;
  async function refreshActivity() {
    const table = $("table.activity");
    if (!table || polling || document.body.dataset.tab !== "activity" || document.hidden) return;
    polling = true;
    try {
      const resp = await fetch(`/api/v1/activity?limit=${ACTIVITY_ROWS}`, { cache: "no-store" });
      if (resp.ok) {
        const data = await resp.json();
        const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
        const rows = (data.rows || []).map((r) => {
          const tr = document.createElement("tr");
          tr.dataset.id = r.id;
          if (r.status >= 400) tr.className = "bad";
          cells(r).forEach((c, i) => {
            const td = document.createElement("td");
            td.dataset.label = heads[i] || "";
            td.textContent = c;
            tr.append(td);
          });
          return tr;
        });
        $("tbody", table).replaceChildren(...rows);
        const empty = $("#activity-empty");
        if (empty && rows.length) empty.remove();
      }
    } catch (err) { /* the next tick tries again */ }
    polling = false;
  }

  // --- playground ---------------------------------------------------------------------------
  let controller = null;
  function setStat(id, text) { const n = $(`#${id}`); if (n) n.textContent = text; }

  // SSE lines of an OpenAI stream -> each event's JSON (or null for [DONE]).
  function* events(buffer) {
    for (const line of buffer) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") { yield null; continue; }
      try { yield JSON.parse(data); } catch (err) { /* not JSON: skip */ }
    }
  }

  // With API keys on, an admin's page carries a key for the playground (data-key); a reload
  // of the config replaces the proxy's keys, and a fresh page render puts it back.
  function post(body) {
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    const key = $("#play").dataset.key;
    if (key) headers.Authorization = `Bearer ${key}`;
    return fetch("/v1/chat/completions", { method: "POST", signal: controller.signal, headers, body });
  }

  async function renewKey() {
    try {
      const resp = await fetch(location.pathname, { cache: "no-store" });
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.querySelector("#play");
      if (!fresh || !fresh.dataset.key) return false;
      $("#play").dataset.key = fresh.dataset.key;
      return true;
    } catch (err) { return false; }
  }

  async function send(ev) {
    ev.preventDefault();
    const out = $("#play-out");
    const model = $("#play-model").value;
    const prompt = $("#play-prompt").value;
    const maxTokens = Number($("#play-max").value) || 64;
    out.textContent = "";
    ["play-ttft", "play-rate", "play-tokens"].forEach((id) => setStat(id, "–"));
    setStat("play-state", "sending…");
    $("#play-send").disabled = true;
    $("#play-stop").disabled = false;
    controller = new AbortController();
    const t0 = performance.now();
    let first = null, last = null, pieces = 0, usage = null;
    try {
      const body = JSON.stringify({ model, stream: true, max_tokens: maxTokens,
        stream_options: { include_usage: true }, messages: [{ role: "user", content: prompt }] });
      let resp = await post(body);
      if (resp.status === 401 && await renewKey()) resp = await post(body);
      if (!resp.ok || !resp.body) {
        const data = await resp.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
      }
      setStat("play-state", "streaming…");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let rest = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const lines = (rest + decoder.decode(value, { stream: true })).split("\n");
        rest = lines.pop();
        for (const e of events(lines)) {
          if (!e) continue;
          if (e.error) throw new Error(e.error.message || "the engine broke off");
          if (e.usage) usage = e.usage;
          const text = e.choices && e.choices[0] && e.choices[0].delta && e.choices[0].delta.content;
          if (!text) continue;
          const now = performance.now();
          if (first === null) { first = now; setStat("play-ttft", `${Math.round(first - t0)} ms`); }
          last = now;
          pieces += 1;
          out.append(document.createTextNode(text));
        }
      }
      const tokens = usage && typeof usage.completion_tokens === "number" ? usage.completion_tokens : pieces;
      setStat("play-tokens", String(tokens));
      if (first !== null && last > first && tokens > 1) {
        setStat("play-rate", ((tokens - 1) / ((last - first) / 1000)).toFixed(1));
      }
      setStat("play-state", "done");
    } catch (err) {
      setStat("play-state", controller.signal.aborted ? "stopped" : `error: ${err.message || err}`);
    }
    $("#play-send").disabled = false;
    $("#play-stop").disabled = true;
    controller = null;
  }

  const form = $("#play");
  if (form) form.addEventListener("submit", send);
  const stop = $("#play-stop");
  if (stop) stop.addEventListener("click", () => { if (controller) controller.abort(); });

  showTab();
  setInterval(refreshActivity, 2000);
  document.addEventListener("visibilitychange", refreshActivity);
})();
