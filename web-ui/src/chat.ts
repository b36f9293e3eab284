// The zero-install web chat, first part: the login form. It is small and shows
// at once; the Matrix client (matrix-js-sdk with its Rust crypto in WebAssembly,
// in chatview.ts) starts downloading while the person types.
import type { Texts } from "./i18n";
import { el } from "./dom";

export type Session = { hs: string; token: string; userId: string; deviceId: string };

const KEY = "chat_session";

export function savedSession(hs: string): Session | null {
  try {
    const s = JSON.parse(localStorage.getItem(KEY) || "null");
    return s && s.hs === hs && s.deviceId ? s : null;
  } catch {
    return null;
  }
}

export function forgetSession() {
  localStorage.removeItem(KEY);
}

const loadView = () => import("./chatview");

export function openChat(root: HTMLElement, t: Texts, hs: string, back: () => void) {
  const view = loadView();
  const session = savedSession(hs);
  if (session) {
    root.replaceChildren(el("p", { id: "chat-status", role: "status" }, t.chatLoading));
    view.then((v) => v.chatView(root, t, session, null, back));
    return;
  }
  const form = el("form", { id: "chat-login" });
  const user = el("input", { name: "chat-user", required: "", autocomplete: "username" });
  const pass = el("input", { name: "chat-password", type: "password", required: "", autocomplete: "current-password" });
  const status = el("p", { id: "chat-status", role: "status" });
  const submit = el("button", { type: "submit" }, t.chatLogin);
  const backBtn = el("button", { type: "button", id: "chat-back" }, t.back);
  backBtn.onclick = back;
  form.append(el("h1", {}, t.chatTitle), el("label", {}, t.username, el("br"), user), el("br"), el("label", {}, t.password, el("br"), pass), el("br"), submit, " ", backBtn, status);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      const r = await fetch(`${hs}/_matrix/client/v3/login`, {
        method: "POST",
        body: JSON.stringify({
          type: "m.login.password",
          identifier: { type: "m.id.user", user: user.value.trim().toLowerCase() },
          password: pass.value,
          initial_device_display_name: "Secta web chat",
        }),
      });
      const j = await r.json().catch(() => ({}));
      if (!r.ok) {
        status.textContent = r.status === 429 ? t.errRate : t.adminBadLogin;
        return;
      }
      const s: Session = { hs, token: j.access_token, userId: j.user_id, deviceId: j.device_id };
      localStorage.setItem(KEY, JSON.stringify(s));
      status.textContent = t.chatLoading;
      (await view).chatView(root, t, s, pass.value, back);
    } catch (e) {
      status.textContent = `${t.errOther} ${e}`;
    } finally {
      submit.disabled = false;
    }
  };
  root.replaceChildren(form);
  user.focus();
}
