// The ATP console: hand-written, no dependency, no build step. All data
// comes from the server's /admin/ JSON endpoints; the admin key (when the
// server is not in dev mode) is kept in this tab's sessionStorage and sent
// as "Authorization: Bearer".
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const dev = document.body.dataset.mode === "dev";
  const KEY = "atp-console-admin-key";
  const POLL_MS = 2000;
  const MAX_CALLS = 500;
  let key = sessionStorage.getItem(KEY) || "";
  // Each start of the console (a key given) is a new generation; the
  // loops of an older one stop.
  let generation = 0;
  let toolkits = [];
  let toolkitsText = "";
  let calls = [];
  let liveAbort = null;
  let fieldCount = 0;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of kids) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  class Refused extends Error {}

  function headers(extra) {
    const h = Object.assign({}, extra);
    if (key) h.authorization = "Bearer " + key;
    return h;
  }

  async function api(path, method, body) {
    const init = { method: method || "GET", headers: headers({ accept: "application/json" }) };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) throw new Refused("The admin key was refused.");
    let data = null;
    try { data = await r.json(); } catch (_) { data = null; }
    if (!r.ok) throw new Error((data && data.error) || "HTTP " + r.status);
    return data;
  }

  function status(text, bad) {
    $("status").textContent = text;
    $("status").classList.toggle("bad", !!bad);
  }

  // --- Access -----------------------------------------------------------

  function askForKey(message) {
    generation++;
    if (liveAbort) liveAbort.abort();
    key = "";
    sessionStorage.removeItem(KEY);
    $("nav").hidden = true;
    $("forget").hidden = true;
    for (const v of document.querySelectorAll(".view")) v.hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("admin-key").focus();
  }

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("admin-key").value;
    $("admin-key").value = "";
    sessionStorage.setItem(KEY, key);
    start();
  });

  $("forget").addEventListener("click", () => askForKey(""));

  function start() {
    $("login").hidden = true;
    $("nav").hidden = false;
    $("forget").hidden = dev;
    const gen = ++generation;
    toolkitsText = "";
    // Back from an OAuth provider: ?view=oauth&status=…
    const back = new URLSearchParams(location.search);
    if (back.get("view")) {
      if (back.get("status")) {
        $("oauth-message").textContent = back.get("status") === "success"
          ? `Connected ${back.get("external_user_id") || "the user"} to ${back.get("platform_id") || "the platform"}.`
          : `The connection failed: ${back.get("error") || back.get("status")}.`;
      }
      history.replaceState(null, "", "/console#" + back.get("view"));
    }
    show(location.hash.slice(1) || "toolkits");
    pollToolkits(gen);
    live(gen);
    pollWebhooks(gen);
  }

  // --- Views ------------------------------------------------------------

  function show(view) {
    if (!document.querySelector(`[data-panel="${CSS.escape(view)}"]`)) view = "toolkits";
    if (view === "oauth") loadOAuth();
    if (view === "webhooks") loadWebhooks();
    for (const v of document.querySelectorAll(".view")) v.hidden = v.dataset.panel !== view;
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.dataset.view === view) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }
  window.addEventListener("hashchange", () => { if (!$("nav").hidden) show(location.hash.slice(1)); });

  // --- Toolkits ---------------------------------------------------------

  async function pollToolkits(gen) {
    if (gen !== generation) return;
    try {
      const data = await api("/admin/toolkits");
      if (gen !== generation) return;
      const text = JSON.stringify(data.toolkits);
      if (text !== toolkitsText) {
        toolkitsText = text;
        toolkits = data.toolkits;
        renderToolkits();
      }
      status(dev ? "Dev mode: open on loopback." : "");
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof Refused) return askForKey(e.message);
      status("The server does not answer: " + e.message, true);
    }
    setTimeout(() => pollToolkits(gen), POLL_MS);
  }

  function time(ms) {
    const d = new Date(ms);
    return el("time", { datetime: d.toISOString(), text: d.toLocaleString() });
  }

  function renderToolkits() {
    const list = $("toolkits");
    list.replaceChildren();
    $("toolkits-empty").hidden = toolkits.length > 0;
    for (const kit of toolkits) {
      const facts = el("ul", { class: "facts", "aria-label": "About " + kit.name });
      const connection = el("li", { class: kit.connected ? "up" : "down", "data-connection": kit.connected ? "connected" : "disconnected" },
        kit.connected ? "connected" : "not connected");
      if (kit.connected && kit.since_ms) connection.append(" since ", time(kit.since_ms));
      facts.append(connection);
      if (kit.transport) {
        let where = kit.transport;
        if (kit.transport === "endpoint" && kit.endpoint) where += " " + kit.endpoint;
        if (kit.instance === "this") where += ", this server";
        else if (kit.instance) where += ", server " + kit.instance;
        facts.append(el("li", { "data-transport": kit.transport, text: "transport: " + where }));
      }
      facts.append(el("li", { text: kit.public ? "public" : "private" }));
      if (kit.language) facts.append(el("li", { text: kit.language }));
      const tools = el("ul", { class: "tools" });
      for (const tool of kit.tools) {
        tools.append(el("li", {},
          el("code", { text: tool.name }),
          el("span", { class: "desc", text: tool.description }),
          el("button", {
            type: "button", class: "quiet", "data-try": kit.name + "/" + tool.name,
            "aria-label": `Try ${tool.name} of ${kit.name}`,
            onclick: () => openTool(kit.name, tool.name),
          }, "Try")));
      }
      list.append(el("article", { class: "toolkit", "data-toolkit": kit.name, "aria-labelledby": "kit-" + kit.name },
        el("h3", { id: "kit-" + kit.name, text: kit.name }), facts, tools));
    }
  }

  // --- Try a tool -------------------------------------------------------

  function typeOf(schema) {
    let t = schema && schema.type;
    if (Array.isArray(t)) t = t.find((x) => x !== "null");
    if (!t && schema && schema.properties) t = "object";
    return t;
  }

  function labelled(name, required, schema) {
    return name + (required ? " (required)" : "") + (schema && schema.title && schema.title !== name ? " — " + schema.title : "");
  }

  // A form part for `schema`: { node, read }, read() giving the value or
  // undefined (left out).
  function build(schema, name, required) {
    schema = schema || {};
    const id = "field-" + (++fieldCount);
    const type = typeOf(schema);
    const hint = schema.description ? el("p", { class: "hint", id: id + "-hint", text: schema.description }) : null;
    const described = hint ? id + "-hint" : null;
    const wrap = (control, check) => el("div", { class: check ? "field check" : "field" },
      check ? control : el("label", { for: id, text: labelled(name, required, schema) }),
      check ? el("label", { for: id, text: labelled(name, required, schema) }) : control, hint);

    if (Array.isArray(schema.enum)) {
      const select = el("select", { id, name, required, "aria-describedby": described });
      if (!required) select.append(el("option", { value: "", text: "(not set)" }));
      schema.enum.forEach((v, i) => select.append(el("option", { value: String(i), text: typeof v === "string" ? v : JSON.stringify(v) })));
      return { node: wrap(select), read: () => select.value === "" ? undefined : schema.enum[Number(select.value)] };
    }
    if (type === "string") {
      const input = el("input", { id, name, type: "text", required, "aria-describedby": described,
        minlength: schema.minLength, maxlength: schema.maxLength, pattern: schema.pattern });
      return { node: wrap(input), read: () => (input.value === "" && !required ? undefined : input.value) };
    }
    if (type === "integer" || type === "number") {
      const input = el("input", { id, name, type: "number", required, "aria-describedby": described,
        step: type === "integer" ? "1" : "any", min: schema.minimum, max: schema.maximum });
      return { node: wrap(input), read: () => (input.value === "" ? undefined : Number(input.value)) };
    }
    if (type === "boolean") {
      if (required) {
        const box = el("input", { id, name, type: "checkbox", "aria-describedby": described });
        return { node: wrap(box, true), read: () => box.checked };
      }
      const select = el("select", { id, name, "aria-describedby": described },
        el("option", { value: "", text: "(not set)" }), el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
      return { node: wrap(select), read: () => (select.value === "" ? undefined : select.value === "true") };
    }
    if (type === "object" && schema.properties) {
      const set = el("fieldset", { "aria-describedby": described }, el("legend", { text: labelled(name, required, schema) }), hint);
      const parts = objectParts(schema, set);
      return { node: set, read: () => {
        const v = readObject(parts);
        return Object.keys(v).length === 0 && !required ? undefined : v;
      } };
    }
    if (type === "array" && schema.items && !Array.isArray(schema.items)) {
      const set = el("fieldset", { "aria-describedby": described }, el("legend", { text: labelled(name, required, schema) }), hint);
      const items = el("div");
      const rows = [];
      const renumber = () => rows.forEach((r, i) => {
        const title = r.node.querySelector("label, legend");
        if (title) title.textContent = labelled(name + " item " + (i + 1), true, schema.items);
        r.remove.textContent = "Remove item " + (i + 1);
        r.remove.setAttribute("aria-label", `Remove item ${i + 1} of ${name}`);
      });
      const add = el("button", { type: "button", class: "quiet", "aria-label": "Add an item to " + name, onclick: () => {
        const part = build(schema.items, name + " item " + (rows.length + 1), true);
        const row = { part };
        row.remove = el("button", { type: "button", class: "quiet", onclick: () => {
          rows.splice(rows.indexOf(row), 1);
          row.node.remove();
          renumber();
          add.focus();
        } });
        row.node = el("div", { class: "item" }, part.node, row.remove);
        rows.push(row);
        items.append(row.node);
        renumber();
      } }, "Add an item");
      set.append(items, add);
      return { node: set, read: () => {
        const v = rows.map((r) => r.part.read()).filter((x) => x !== undefined);
        return v.length === 0 && !required ? undefined : v;
      } };
    }
    // Anything else (no type, several, free-form objects): JSON.
    const area = el("textarea", { id, name, required, "aria-describedby": described, spellcheck: "false" });
    const node = wrap(area);
    node.querySelector("label").textContent += " (JSON)";
    return { node, read: () => {
      if (area.value.trim() === "") return undefined;
      try { return JSON.parse(area.value); } catch (_) { throw new Error(name + " is not valid JSON"); }
    } };
  }

  function objectParts(schema, into) {
    const required = new Set(schema.required || []);
    const parts = [];
    for (const [prop, sub] of Object.entries(schema.properties || {})) {
      const part = build(sub, prop, required.has(prop));
      parts.push([prop, part]);
      into.append(part.node);
    }
    return parts;
  }

  function readObject(parts) {
    const out = {};
    for (const [prop, part] of parts) {
      const v = part.read();
      if (v !== undefined) out[prop] = v;
    }
    return out;
  }

  let current = null;

  function openTool(kitName, toolName) {
    const kit = toolkits.find((k) => k.name === kitName);
    const tool = kit && kit.tools.find((t) => t.name === toolName);
    if (!tool) return;
    fieldCount = 0;
    $("try").hidden = false;
    $("try-title").textContent = `Try ${tool.name} of ${kit.name}`;
    $("try-description").textContent = tool.description;
    const fields = $("try-fields");
    fields.replaceChildren();
    const schema = tool.input_schema && typeof tool.input_schema === "object" ? tool.input_schema : {};
    const parts = objectParts(schema, fields);
    if (parts.length === 0) fields.append(el("p", { class: "hint", text: "This tool takes no arguments." }));
    const auth = $("try-auth");
    auth.replaceChildren();
    let token = null;
    if (tool.auth_provider) {
      token = el("input", { id: "try-token", type: "password", autocomplete: "off", "aria-describedby": "try-token-hint" });
      auth.append(el("div", { class: "field" },
        el("label", { for: "try-token", text: "Auth token" }), token,
        el("p", { class: "hint", id: "try-token-hint",
          text: `This tool needs a token from ${tool.auth_provider}${tool.auth_type ? " (" + tool.auth_type + ")" : ""}. It is sent with this call only.` })));
    }
    let connection = null;
    if (tool.oauth_platform) {
      connection = el("select", { id: "try-connection", "aria-describedby": "try-connection-hint" },
        el("option", { value: "", text: "(none: use the token above)" }));
      auth.append(el("div", { class: "field" },
        el("label", { for: "try-connection", text: "Or a user's connection" }), connection,
        el("p", { class: "hint", id: "try-connection-hint", text: "The server gives the tool this user's stored token (refreshed if needed)." })));
      api("/admin/oauth").then((data) => {
        for (const c of data.connections) {
          if (c.provider !== tool.auth_provider) continue;
          connection.append(el("option", { value: c.id, text: `${c.external_user_id} (${c.platform_id}${c.owner ? ", " + c.owner : ""})` }));
        }
      }).catch(() => {});
    }
    current = { kit: kit.name, tool: tool.name, parts, token, connection };
    $("try-outcome").hidden = true;
    $("app").hidden = true;
    session = null;
    renderFormats(kit.name, tool.name);
    $("try-title").setAttribute("tabindex", "-1");
    $("try-title").focus();
  }

  $("try-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!current || !e.target.reportValidity()) return;
    const { kit, tool, parts, token, connection } = current;
    let args;
    try {
      args = readObject(parts);
    } catch (err) {
      return outcome(false, err.message, null);
    }
    const body = { arguments: args };
    if (token && token.value) body.auth_token = token.value;
    else if (connection && connection.value) body.connection = connection.value;
    $("try-submit").disabled = true;
    try {
      const answer = await api(`/admin/toolkits/${encodeURIComponent(kit)}/tools/${encodeURIComponent(tool)}/call`, "POST", body);
      if (answer.ok) outcome(true, JSON.stringify(answer.result, null, 2), answer.duration_ms);
      else outcome(false, `${answer.error.code}: ${answer.error.message}`, answer.duration_ms);
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      outcome(false, err.message, null);
    } finally {
      $("try-submit").disabled = false;
    }
  });

  // --- App sessions -----------------------------------------------------

  let session = null;

  function showApp(answer) {
    const p = (answer && answer.payload) || {};
    const box = $("app");
    box.hidden = false;
    if (p.error) {
      box.dataset.outcome = "error";
      $("app-state").textContent = `Error ${p.code || ""}: ${p.error}`;
      $("app-state").className = "error-text";
      if (p.code === "session_ended" || p.code === "session_not_found") endApp(false);
      return;
    }
    box.dataset.outcome = "ok";
    $("app-state").className = "";
    if (p.session_id) session = p.session_id;
    if (p.ui_content !== undefined) $("app-ui").textContent = JSON.stringify(p.ui_content, null, 2);
    if (p.terminated) endApp(true);
    else $("app-state").textContent = "Session " + session + " is open.";
  }

  function endApp(said) {
    if (said) $("app-state").textContent = "The session is over.";
    $("app").dataset.session = "ended";
    $("app-send").disabled = true;
    $("app-end").disabled = true;
    session = null;
  }

  $("app-start").addEventListener("click", async () => {
    const form = $("try-form");
    if (!current || !form.reportValidity()) return;
    let args;
    try { args = readObject(current.parts); } catch (err) { return outcome(false, err.message, null); }
    const body = { arguments: args };
    if (current.token && current.token.value) body.auth_token = current.token.value;
    $("app-send").disabled = false;
    $("app-end").disabled = false;
    $("app").dataset.session = "open";
    $("app-ui").textContent = "";
    try {
      showApp(await api(`/admin/toolkits/${encodeURIComponent(current.kit)}/tools/${encodeURIComponent(current.tool)}/app`, "POST", body));
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      showApp({ payload: { error: err.message } });
    }
  });

  $("app-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!session) return;
    let data;
    try { data = JSON.parse($("app-action").value || "null"); }
    catch (_) { return showApp({ payload: { error: "The action data is not valid JSON" } }); }
    try {
      showApp(await api(`/admin/apps/${encodeURIComponent(session)}/action`, "POST", { action_data: data }));
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      showApp({ payload: { error: err.message } });
    }
  });

  $("app-end").addEventListener("click", async () => {
    if (!session) return;
    try {
      const answer = await api(`/admin/apps/${encodeURIComponent(session)}`, "DELETE");
      if (answer.payload && answer.payload.error) showApp(answer);
      else endApp(true);
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      showApp({ payload: { error: err.message } });
    }
  });

  function outcome(ok, text, ms) {
    const box = $("try-outcome");
    box.hidden = false;
    box.className = ok ? "ok" : "error";
    box.dataset.outcome = ok ? "ok" : "error";
    box.setAttribute("role", ok ? "status" : "alert");
    $("try-outcome-title").textContent = ok ? "Result" : "Error";
    $("try-duration").textContent = ms === null ? "" : `Took ${ms.toFixed(1)} ms.`;
    $("try-result").textContent = text;
  }

  const FORMATS = [["openai", "OpenAI (Responses)"], ["openai_chat", "OpenAI Chat Completions"],
    ["anthropic", "Anthropic"], ["mistral", "Mistral"], ["mcp", "MCP tools/list entry"]];

  async function renderFormats(kit, tool) {
    const box = $("try-formats");
    box.replaceChildren();
    let data;
    try {
      data = await api(`/admin/toolkits/${encodeURIComponent(kit)}/tools/${encodeURIComponent(tool)}/formats`);
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      box.append(el("p", { class: "error-text", text: "No formats: " + err.message }));
      return;
    }
    for (const [name, title] of FORMATS) {
      const text = JSON.stringify(data[name], null, 2);
      // The accessible name starts with the visible text, whichever it is.
      const said = (shown) => { copy.textContent = shown; copy.setAttribute("aria-label", shown + " (the " + title + " format)"); };
      const copy = el("button", { type: "button", class: "quiet", onclick: async () => {
        try { await navigator.clipboard.writeText(text); said("Copied"); }
        catch (_) { said("Copy failed: select the text"); }
      } });
      said("Copy");
      box.append(el("details", { "data-format": name }, el("summary", { text: title }),
        el("pre", { tabindex: "0", "aria-label": title + " format", text }), copy));
    }
  }

  // --- OAuth ------------------------------------------------------------

  let oauthText = "";

  async function loadOAuth() {
    let data;
    try {
      data = await api("/admin/oauth");
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      $("oauth-message").textContent = "The OAuth state could not be read: " + err.message;
      return;
    }
    // Redrawn only when something changed (a redraw loses the focus).
    const text = JSON.stringify(data);
    if (text === oauthText) return;
    oauthText = text;
    const platforms = $("platforms-body");
    platforms.replaceChildren();
    const select = $("connect-platform");
    const chosen = select.value;
    select.replaceChildren();
    for (const p of data.platforms) {
      platforms.append(el("tr", {}, el("td", {}, el("code", { text: p.id })), el("td", { text: p.name }),
        el("td", { text: p.provider }), el("td", { text: p.scopes.join(" ") })));
      select.append(el("option", { value: p.id, text: p.name + " (" + p.id + ")" }));
    }
    if (chosen) select.value = chosen;
    $("platforms-empty").hidden = data.platforms.length > 0;
    $("platforms").hidden = data.platforms.length === 0;
    $("connect-form").hidden = data.platforms.length === 0;
    const body = $("connections-body");
    body.replaceChildren();
    const now = Date.now();
    for (const c of data.connections) {
      let expires = "no expiry";
      if (c.expires_at_ms) expires = c.expires_at_ms <= now ? "expired (refreshed on use)" : null;
      const revoke = el("button", { type: "button", class: "quiet", "aria-label": `Revoke ${c.external_user_id}'s connection to ${c.platform_id}`,
        onclick: async () => {
          try {
            await api("/admin/oauth/connections/" + encodeURIComponent(c.id), "DELETE");
            $("oauth-message").textContent = `Revoked ${c.external_user_id}'s connection to ${c.platform_id}.`;
          } catch (err) {
            if (err instanceof Refused) return askForKey(err.message);
            $("oauth-message").textContent = "Not revoked: " + err.message;
          }
          loadOAuth();
        } }, "Revoke");
      body.append(el("tr", { "data-connection-user": c.external_user_id },
        el("td", { text: c.external_user_id }), el("td", { text: c.platform_id }), el("td", { text: c.owner || "another key" }),
        el("td", {}, expires === null ? time(c.expires_at_ms) : expires), el("td", {}, time(c.updated_at_ms)), el("td", {}, revoke)));
    }
    $("connections-empty").hidden = data.connections.length > 0;
  }

  $("connect-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const platform = $("connect-platform").value;
    try {
      const answer = await api(`/admin/oauth/platforms/${encodeURIComponent(platform)}/connect`, "POST",
        { external_user_id: $("connect-user").value });
      $("connect-link").href = answer.authorization_url;
      $("connect-next").hidden = false;
      $("connect-link").focus();
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      $("oauth-message").textContent = "Not started: " + err.message;
    }
  });

  // --- Webhooks ---------------------------------------------------------

  // While the view is shown, its deliveries are re-read every 2 s.
  function pollWebhooks(gen) {
    if (gen !== generation) return;
    if (!$("view-webhooks").hidden) loadWebhooks();
    setTimeout(() => pollWebhooks(gen), POLL_MS);
  }

  let webhooksText = "";

  async function loadWebhooks() {
    let data;
    try {
      data = await api("/admin/webhooks");
    } catch (err) {
      if (err instanceof Refused) return askForKey(err.message);
      $("webhooks-message").textContent = "The webhooks could not be read: " + err.message;
      return;
    }
    const text = JSON.stringify(data.webhooks);
    if (text === webhooksText) return;
    webhooksText = text;
    const box = $("webhooks");
    // Keep the focus on a resend button across a refresh.
    const focused = document.activeElement && document.activeElement.dataset.resend;
    box.replaceChildren();
    $("webhooks-empty").hidden = data.webhooks.length > 0;
    for (const h of data.webhooks) {
      const rows = el("tbody");
      for (const d of h.deliveries) {
        const answer = d.last_status ? "HTTP " + d.last_status : "";
        const resend = el("button", { type: "button", class: "quiet", "data-resend": d.id,
          "aria-label": `Resend the ${d.event} delivery of ${d.id}`,
          onclick: async () => {
            try {
              await api(`/admin/webhooks/deliveries/${encodeURIComponent(d.id)}/resend`, "POST", {});
              $("webhooks-message").textContent = `Delivery ${d.id} queued again.`;
            } catch (err) {
              if (err instanceof Refused) return askForKey(err.message);
              $("webhooks-message").textContent = "Not queued: " + err.message;
            }
            loadWebhooks();
          } }, "Resend");
        rows.append(el("tr", { "data-delivery": d.id, "data-status": d.status },
          el("td", { text: d.event }), el("td", { class: "outcome", text: d.status }), el("td", { text: String(d.attempts) }),
          el("td", { text: d.last_error && d.last_error !== answer ? [answer, d.last_error].filter(Boolean).join(": ") : answer }),
          el("td", {}, time(d.created_at_ms)), el("td", {}, d.delivered_at_ms ? time(d.delivered_at_ms) : ""), el("td", {}, resend)));
      }
      const table = el("table", {},
        el("caption", { class: "visually-hidden", text: "Latest deliveries to " + h.url }),
        el("thead", {}, el("tr", {}, ...["Event", "Status", "Attempts", "Last answer", "Queued", "Delivered", "Resend"].map((t) => el("th", { scope: "col", text: t })))),
        rows);
      box.append(el("article", { class: "toolkit", "data-webhook": h.id, "aria-label": "Webhook " + h.url },
        el("h3", {}, el("code", { text: h.url })),
        el("ul", { class: "facts" }, el("li", { text: "events: " + h.events.join(", ") }),
          el("li", { text: "owner: " + (h.owner || "another key") }), el("li", {}, "since ", time(h.created_at_ms))),
        h.deliveries.length ? table : el("p", { class: "hint", text: "No delivery yet." })));
    }
    if (focused) {
      const again = box.querySelector(`[data-resend="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  // --- Live calls -------------------------------------------------------

  function liveState(state, text) {
    const s = $("live-state");
    s.dataset.state = state;
    s.textContent = text;
  }

  async function live(gen) {
    let backoff = 500;
    while (gen === generation) {
      liveAbort = new AbortController();
      try {
        const r = await fetch("/admin/calls/live", { headers: headers({ accept: "text/event-stream" }), cache: "no-store", signal: liveAbort.signal });
        if (gen !== generation) return;
        if (r.status === 401) return askForKey("The admin key was refused.");
        if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
        liveState("open", "live");
        backoff = 500;
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            onEvent(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (_) {
        if (gen !== generation) return;
      }
      if (gen !== generation) return;
      liveState("closed", "reconnecting…");
      await new Promise((done) => setTimeout(done, backoff));
      backoff = Math.min(backoff * 2, 10000);
    }
  }

  function onEvent(block) {
    let event = "message";
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) event = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (event === "call") {
      try { calls.unshift(JSON.parse(data)); } catch (_) { return; }
      if (calls.length > MAX_CALLS) calls.length = MAX_CALLS;
      renderCalls();
    } else if (event === "lagged") {
      status(`The live list fell behind and missed ${data} call(s).`, true);
    }
  }

  function renderCalls() {
    const kit = $("filter-toolkit").value.trim().toLowerCase();
    const tool = $("filter-tool").value.trim().toLowerCase();
    const outcome = $("filter-outcome").value;
    const body = $("calls-body");
    body.replaceChildren();
    let shown = 0;
    for (const c of calls) {
      const ok = c.outcome === "ok";
      if (kit && !c.toolkit.toLowerCase().includes(kit)) continue;
      if (tool && !c.tool.toLowerCase().includes(tool)) continue;
      if ((outcome === "ok" && !ok) || (outcome === "error" && ok)) continue;
      shown++;
      body.append(el("tr", { class: ok ? "succeeded" : "failed", "data-tool": c.tool, "data-outcome": c.outcome },
        el("td", {}, time(c.at_ms)), el("td", { text: c.toolkit }), el("td", { text: c.tool }),
        el("td", { text: c.transport }), el("td", { class: "outcome", text: ok ? "ok" : "failed: " + c.outcome }),
        el("td", { text: c.duration_ms.toFixed(1) + " ms" })));
    }
    $("calls-empty").hidden = shown > 0;
    $("calls-empty").textContent = calls.length ? "No call matches the filters." : "No call yet.";
  }

  for (const id of ["filter-toolkit", "filter-tool", "filter-outcome"]) {
    $(id).addEventListener("input", renderCalls);
    $(id).addEventListener("change", renderCalls);
  }
  $("call-filters").addEventListener("submit", (e) => e.preventDefault());

  if (dev || key) start();
  else askForKey("");
})();
