import { texts, type Lang, type Texts } from "./i18n";
import { register, type RegisterResult } from "./matrix";
import { el } from "./dom";

type BoxInfo = { box_name: string; homeserver: string; server_name: string; accepted: boolean; radio?: string; panel?: string; setup_needed?: string; about?: string; rules?: string };

const app = document.getElementById("app")!;
let lang: Lang = (localStorage.getItem("lang") as Lang) || "ru";

function errorText(t: Texts, r: Extract<RegisterResult, { ok: false }>): string {
  switch (r.errcode) {
    case "M_USER_IN_USE": return t.errTaken;
    case "M_INVALID_USERNAME": return t.errName;
    case "M_WEAK_PASSWORD": return (t.weak as Record<string, string>)[r.reason] ?? t.errWeak;
    case "M_FORBIDDEN": return t.errToken;
    case "M_LIMIT_EXCEEDED": return t.errRate;
    case "SECTA_RULES_NOT_ACCEPTED": return t.errRules;
    default: return `${t.errOther} ${r.error}`;
  }
}

// The admin's texts (plain text; blank lines separate paragraphs), else the built-in ones.
function paragraphs(text: string | undefined, fallback: string, id: string): HTMLElement {
  const box = el("div", { id });
  const parts = (text && text.trim() ? text : fallback).split(/\n\s*\n/);
  for (const p of parts) {
    const para = el("p");
    p.split("\n").forEach((line, i) => {
      if (i > 0) para.append(el("br"));
      para.append(line);
    });
    box.append(para);
  }
  return box;
}

async function render(info: BoxInfo) {
  const t = texts[lang];
  document.documentElement.lang = lang;
  document.title = info.box_name;
  app.replaceChildren();
  const switcher = el("button", { id: "lang", type: "button" }, t.lang);
  switcher.onclick = () => {
    lang = lang === "ru" ? "en" : "ru";
    localStorage.setItem("lang", lang);
    render(info);
  };
  app.append(switcher, el("h1", {}, `${t.welcome} — ${info.box_name}`));
  if (info.setup_needed) {
    app.append(el("p", { id: "setup-needed", role: "alert" }, t.setupNeeded, " ", el("code", {}, info.setup_needed)));
  }
  app.append(paragraphs(info.about, t.about, "about"), paragraphs(info.rules, t.rules, "rules"));

  const connect = el("section", { id: "connect" });
  if (info.accepted) {
    connect.append(el("p", { id: "connected" }, t.connected));
  } else {
    const b = el("button", { id: "accept", type: "button" }, t.connect);
    b.onclick = async () => {
      const r = await fetch("/accept", { method: "POST" });
      if (r.ok) render({ ...info, accepted: true });
    };
    connect.append(b);
  }
  app.append(connect);

  const form = el("form", { id: "register" });
  const user = el("input", { name: "username", required: "", autocomplete: "username", pattern: "[a-zA-Z0-9._=/+-]+" });
  const pass = el("input", { name: "password", type: "password", required: "", autocomplete: "new-password" });
  const code = el("input", { name: "invite", autocomplete: "off" });
  const rules = el("input", { name: "accept-rules", type: "checkbox" });
  const submit = el("button", { type: "submit" }, t.register);
  const status = el("p", { id: "status", role: "status" });
  form.append(
    el("h2", {}, t.createAccount),
    el("label", {}, t.username, el("br"), user), el("br"),
    el("label", {}, t.password, el("br"), pass), el("br"),
    el("label", {}, t.invite, el("br"), code), el("br"),
    el("label", { class: "check" }, rules, t.acceptRules),
    submit, status,
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    status.textContent = t.registering;
    try {
      const r = await register(user.value.trim().toLowerCase(), pass.value, code.value.trim(), rules.checked);
      status.textContent = r.ok ? `${t.done} ${r.userId}` : errorText(t, r);
      if (r.ok) {
        form.dataset.done = "1";
        if (!info.accepted) render({ ...info, accepted: true }).then(() => (document.getElementById("status")!.textContent = `${t.done} ${r.userId}`));
      }
    } catch (e) {
      status.textContent = `${t.errOther} ${e}`;
    } finally {
      submit.disabled = false;
    }
  };
  app.append(form);
  app.append(el("h2", {}, t.chatTitle), el("p", {}, el("a", { id: "open-chat", href: "#chat" }, t.openChat)));
  if (info.radio) {
    app.append(el("h2", {}, t.radioTitle), el("p", {}, el("a", { id: "open-radio", href: "#radio" }, t.openRadio)));
  }
  if (info.panel) {
    app.append(el("h2", {}, t.panelTitle), el("p", {}, el("a", { id: "open-panel", href: "#panel" }, t.openPanel)));
  }
  app.append(
    el("h2", {}, t.appsTitle),
    el("p", {}, t.apps, " ", el("code", { id: "server" }, info.homeserver)),
    el("p", { class: "sys" }, t.appsHow),
    el("img", { id: "server-qr", class: "qr", src: "/api/server-qr.svg", alt: t.serverQr, width: "192", height: "192" }),
  );
  app.append(el("p", {}, el("a", { id: "open-admin", href: "#admin" }, t.openAdmin)));
}

// The chat, radio and admin pages are chunks of their own, fetched only when opened.
async function route(info: BoxInfo) {
  const t = texts[lang];
  const home = () => {
    location.hash = "";
  };
  const hash = location.hash;
  if (hash === "#chat") {
    const { openChat } = await import("./chat");
    document.title = `${t.chatTitle} — ${info.box_name}`;
    openChat(app, t, info.homeserver, home);
  } else if (hash === "#radio" && info.radio) {
    const { openRadio } = await import("./radio");
    document.title = `${t.radioTitle} — ${info.box_name}`;
    openRadio(app, t, info.radio, home);
  } else if (hash === "#admin" || hash.startsWith("#admin/")) {
    const { openAdmin } = await import("./admin");
    document.title = `${t.adminTitle} — ${info.box_name}`;
    openAdmin(app, t, info.homeserver, hash.slice("#admin/".length), home);
  } else if (hash === "#panel" && info.panel) {
    const { openPanel } = await import("./panel");
    document.title = `${t.panelTitle} — ${info.box_name}`;
    openPanel(app, t, info.panel, home);
  } else {
    render(info);
  }
}

async function start() {
  const info: BoxInfo = await (await fetch("/box.json", { cache: "no-store" })).json();
  window.addEventListener("hashchange", () => route(info));
  route(info);
}

start();
