// ferroclaw console: live updates and in-place form posts. Served from /ui/assets (the CSP
// allows no inline script). Everything from the server is put in the page as text
// (textContent), never as markup, except the sessions table, which the server rendered
// and escaped itself.
"use strict";

(function () {
  const REFRESH_MS = 5000;

  // Asks the server for a plain-text answer instead of a redirect.
  const FETCH_HEADERS = { "x-console-fetch": "1" };

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function utc(ms) {
    if (!ms || ms <= 0) return "—";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  // --- Sessions table: re-fetched every few seconds while the tab is visible. ---
  function liveRefresh(box) {
    let timer = null;
    async function refresh() {
      if (document.hidden) return;
      try {
        const response = await fetch(box.dataset.refresh, { headers: FETCH_HEADERS, credentials: "same-origin" });
        // Signed out elsewhere: the server redirected to the sign-in page.
        if (response.redirected || !response.ok) return;
        box.innerHTML = await response.text();
        box.dataset.refreshed = String(Date.now());
      } catch (e) {
        // The gateway is restarting: try again on the next tick.
      }
    }
    function schedule() {
      clearInterval(timer);
      timer = document.hidden ? null : setInterval(refresh, REFRESH_MS);
    }
    document.addEventListener("visibilitychange", () => {
      schedule();
      if (!document.hidden) refresh();
    });
    schedule();
  }

  // --- Conversation: messages arrive over server-sent events. ---
  function fileLink(sessionId, path) {
    const segments = path.split("/").map(encodeURIComponent).join("/");
    return "/ui/sessions/" + encodeURIComponent(sessionId) + "/files/" + segments;
  }

  function cardForm(content, csrf) {
    const form = el("form", "card");
    form.method = "post";
    form.action = "/ui/questions/" + encodeURIComponent(content.question_id || "") + "/answer";
    form.dataset.fetch = "answer";
    for (const [name, value] of [["csrf", csrf], ["user", "operator"]]) {
      const input = el("input");
      input.type = "hidden";
      input.name = name;
      input.value = value;
      form.append(input);
    }
    if (typeof content.text === "string") form.append(el("p", "question", content.text));
    const options = el("div", "options");
    for (const option of Array.isArray(content.options) ? content.options : []) {
      const button = el("button", null, option.label || option.id || "?");
      button.type = "submit";
      button.name = "option";
      button.value = option.id || "";
      options.append(button);
    }
    form.append(options, el("p", "status"));
    return form;
  }

  function bubble(message, csrf) {
    const item = el("li", "msg agent");
    item.dataset.cursor = String(message.cursor);
    item.dataset.kind = message.kind;
    item.append(el("div", "meta", message.kind + " · " + utc(message.created_at)));
    // A card shows its question itself.
    if (message.text && message.kind !== "card") item.append(el("div", "text", message.text));
    const content = message.content || {};
    if (message.kind === "card") item.append(cardForm(content, csrf));
    if (message.kind === "file" && typeof content.path === "string") {
      const link = el("a", "file", content.name || content.path);
      link.href = fileLink(message.session_id, content.path);
      link.setAttribute("download", "");
      item.append(link);
    }
    return item;
  }

  function liveChat(chat) {
    const status = document.getElementById("live");
    const source = new EventSource(chat.dataset.events);
    source.addEventListener("open", () => { if (status) status.textContent = "Live."; });
    source.addEventListener("error", () => { if (status) status.textContent = "Reconnecting…"; });
    source.addEventListener("message", (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (chat.querySelector('[data-cursor="' + Number(message.cursor) + '"]')) return;
      chat.append(bubble(message, chat.dataset.csrf));
      chat.lastElementChild.scrollIntoView({ block: "end" });
    });
  }

  // --- Forms posted in place: the answer (or the refusal's reason) shows beside them. ---
  // Bound once on the document, so forms the refresh swaps in work too.
  async function postInPlace(event) {
    event.preventDefault();
    const form = event.target;
    const kind = form.dataset.fetch;
    const data = new FormData(form, event.submitter);
    const sender = document.getElementById("sender");
    if (kind === "answer" && sender) data.set("user", sender.value);
    // The file form sends as the sender chosen in the message form.
    if (form.querySelector("[data-sender-copy]") && sender) data.set("sender", sender.value);
    const status = form.querySelector(".status");
    let response, text;
    try {
      response = await fetch(form.action, {
        method: "POST",
        headers: FETCH_HEADERS,
        credentials: "same-origin",
        // A form with a file goes as multipart; the rest as a plain form.
        body: form.enctype === "multipart/form-data" ? data : new URLSearchParams(data),
      });
      text = await response.text();
    } catch (e) {
      response = { ok: false };
      text = "The gateway did not answer; try again.";
    }
    if (status) {
      status.textContent = text;
      status.classList.toggle("error", !response.ok);
    }
    if (response.ok && kind === "message") {
      const chat = document.getElementById("chat");
      if (!chat) return;
      const mine = el("li", "msg mine");
      mine.append(el("div", "meta", (data.get("sender") || "operator") + " · sent"));
      mine.append(el("div", "text", data.get("text")));
      const file = data.get("file");
      if (file && file.name) mine.append(el("div", "attachment", "📎 " + file.name));
      chat.append(mine);
      form.querySelectorAll("textarea, input[type=file], input[name=text]").forEach((i) => { i.value = ""; });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-refresh]").forEach(liveRefresh);
    document.querySelectorAll("#chat[data-events]").forEach(liveChat);
    document.addEventListener("submit", (event) => {
      if (event.target instanceof HTMLFormElement && event.target.matches("form[data-fetch]")) postInPlace(event);
    });
    // Tests wait for this: the script ran.
    document.documentElement.dataset.js = "ready";
  });
})();
