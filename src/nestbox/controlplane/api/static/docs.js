// Renders the OpenAPI document of this server (openapi.json, same origin) as a browsable list.
// Self-contained on purpose: no framework, no CDN, so the docs work on an offline machine.
"use strict";

(function () {
  const content = document.getElementById("content");
  const filter = document.getElementById("filter");
  let doc = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function resolve(schema) {
    if (schema && schema.$ref) {
      const name = schema.$ref.split("/").pop();
      return [name, doc.components.schemas[name] || {}];
    }
    return [null, schema || {}];
  }

  // A compact, readable rendering of a JSON schema: `{ field: type, ... }`, one level of refs.
  function describe(schema, depth) {
    const [name, s] = resolve(schema);
    if (depth > 3) return name || "object";
    if (s.type === "array") return "[" + describe(s.items, depth + 1) + "]";
    if (s.anyOf) return s.anyOf.map((x) => describe(x, depth + 1)).join(" | ");
    if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (s.properties) {
      const required = new Set(s.required || []);
      const pad = "  ".repeat(depth + 1);
      const lines = Object.entries(s.properties).map(([k, v]) =>
        pad + k + (required.has(k) ? "" : "?") + ": " + describe(v, depth + 1));
      return (name ? name + " " : "") + "{\n" + lines.join("\n") + "\n" + "  ".repeat(depth) + "}";
    }
    if (s.type === "object" && s.additionalProperties) {
      return "{[key]: " + describe(s.additionalProperties, depth + 1) + "}";
    }
    let t = s.type || name || "any";
    if (s.format) t += " (" + s.format + ")";
    return t;
  }

  function section(title, schema) {
    return [el("h4", {}, title), el("pre", {}, describe(schema, 0))];
  }

  function operation(path, method, op) {
    const security = (op.security || []).map((s) => Object.keys(s)[0]);
    const auth = security.length === 0 ? "no auth"
      : security.map((s) => (s === "apiKeyAuth" ? "X-API-Key" : "Bearer")).join(" or ");
    const body = el("div", { class: "body" });
    if (op.description) body.append(el("p", {}, op.description));
    if (op.parameters && op.parameters.length) {
      const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
        el("th", {}, "description")));
      for (const p of op.parameters) {
        table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
          el("td", {}, p.description || "")));
      }
      body.append(el("h4", {}, "Parameters"), table);
    }
    const reqBody = op.requestBody && op.requestBody.content["application/json"];
    if (reqBody) body.append(...section("Request body (JSON)", reqBody.schema));
    for (const [status, resp] of Object.entries(op.responses || {})) {
      const json = resp.content && resp.content["application/json"];
      const title = (status === "default" ? "Errors" : status) + " — " + (resp.description || "");
      if (json) body.append(...section(title, json.schema));
      else body.append(el("h4", {}, title + " (no body)"));
    }
    const summary = el("summary", {},
      el("span", { class: "method " + method }, method.toUpperCase()),
      el("span", { class: "path" }, path),
      el("span", { class: "summary" }, op.summary || ""),
      el("span", { class: "auth" }, auth));
    const details = el("details", {}, summary, body);
    details.dataset.search = (method + " " + path + " " + (op.summary || "")).toLowerCase();
    return details;
  }

  function render() {
    content.replaceChildren();
    const byTag = new Map();
    for (const [path, ops] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const tag = (op.tags && op.tags[0]) || "other";
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push(operation(path, method, op));
      }
    }
    for (const [tag, items] of byTag) {
      const group = el("section", {}, el("h2", {}, tag), ...items);
      content.append(group);
    }
    applyFilter();
    // docs#all opens every operation (handy for printing or searching the page).
    if (location.hash === "#all") {
      for (const d of content.querySelectorAll("details")) d.open = true;
    }
  }

  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    for (const section of content.querySelectorAll("section")) {
      let visible = 0;
      for (const d of section.querySelectorAll("details")) {
        const show = !q || d.dataset.search.includes(q);
        d.style.display = show ? "" : "none";
        if (show) visible++;
      }
      section.style.display = visible ? "" : "none";
    }
  }

  filter.addEventListener("input", applyFilter);
  fetch("openapi.json")
    .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
    .then((d) => {
      doc = d;
      document.getElementById("title").textContent = d.info.title + " " + d.info.version;
      document.getElementById("subtitle").textContent = d.info.description || "";
      render();
    })
    .catch((e) => {
      const sub = document.getElementById("subtitle");
      sub.textContent = "Could not load openapi.json: " + e.message;
      sub.className = "error";
    });
})();
