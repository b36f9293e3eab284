import { texts, type Lang, type Texts } from "./i18n";
import { register } from "./matrix";
import { adminSection } from "./admin";
import { el } from "./dom";

type BoxInfo = {
  box_name: string;
  homeserver: string;
  server_name: string;
  accepted: boolean;
  radio?: string;
  setup_needed?: string;
};

const app = document.getElementById("app")!;
let lang: Lang = (localStorage.getItem("lang") as Lang) || "ru";


function errorText(t: Texts, errcode: string, error: string): string {
  switch (errcode) {
    case "M_USER_IN_USE": return t.errTaken;
    case "M_INVALID_USERNAME": return t.errName;
    case "M_WEAK_PASSWORD": return t.errWeak;
    case "M_FORBIDDEN": return t.errToken;
    case "M_LIMIT_EXCEEDED": return t.errRate;
    default: return `${t.errOther} ${error}`;
  }
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
  app.append(el("p", {}, t.about), el("p", {}, t.rules));

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
  const submit = el("button", { type: "submit" }, t.register);
  const status = el("p", { id: "status", role: "status" });
  form.append(
    el("h2", {}, t.createAccount),
    el("label", {}, t.username, el("br"), user), el("br"),
    el("label", {}, t.password, el("br"), pass), el("br"),
    el("label", {}, t.invite, el("br"), code), el("br"),
    submit, status,
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    if (pass.value.length < 8) {
      status.textContent = t.errWeak;
      return;
    }
    submit.disabled = true;
    status.textContent = t.registering;
    try {
      const r = await register(info.homeserver, user.value.trim().toLowerCase(), pass.value, code.value.trim());
      status.textContent = r.ok ? `${t.done} ${r.userId}` : errorText(t, r.errcode, r.error);
      if (r.ok) form.dataset.done = "1";
    } catch (e) {
      status.textContent = `${t.errOther} ${e}`;
    } finally {
      submit.disabled = false;
    }
  };
  app.append(form);
  const chat = el("a", { id: "open-chat", href: "#chat" }, t.openChat);
  app.append(el("h2", {}, t.chatTitle), el("p", {}, chat));
  if (info.radio) {
    app.append(el("h2", {}, t.radioTitle), el("p", {}, el("a", { id: "open-radio", href: "#radio" }, t.openRadio)));
  }
  app.append(el("h2", {}, t.appsTitle), el("p", {}, t.apps, " ", el("code", { id: "server" }, info.homeserver)));
  app.append(adminSection(t, info.homeserver));
}

// The chat is its own chunk, fetched only when opened.
async function route(info: BoxInfo) {
  if (location.hash === "#chat") {
    const { openChat } = await import("./chat");
    document.title = `${texts[lang].chatTitle} — ${info.box_name}`;
    openChat(app, texts[lang], info.homeserver, () => {
      location.hash = "";
    });
  } else if (location.hash === "#radio" && info.radio) {
    const { openRadio } = await import("./radio");
    document.title = `${texts[lang].radioTitle} — ${info.box_name}`;
    openRadio(app, texts[lang], info.radio, () => {
      location.hash = "";
    });
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
