// The admin corner: log in as a box admin, list and create invite codes
// (the Synapse-compatible admin API of the box's homeserver).
import type { Texts } from "./i18n";
import { el } from "./dom";

type Token = { token: string; uses_allowed: number | null; completed: number };


async function api(homeserver: string, token: string, method: string, path: string, body?: unknown) {
  const r = await fetch(`${homeserver}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, json: await r.json().catch(() => ({})) };
}

export function adminSection(t: Texts, homeserver: string): HTMLElement {
  const section = el("section", { id: "admin" }, el("h2", {}, t.adminTitle));
  const status = el("p", { id: "admin-status", role: "status" });
  const saved = sessionStorage.getItem("admin_token");
  if (saved) {
    section.append(invites(t, homeserver, saved, status));
  } else {
    const form = el("form", { id: "admin-login" });
    const user = el("input", { name: "admin-user", required: "", autocomplete: "username" });
    const pass = el("input", { name: "admin-password", type: "password", required: "", autocomplete: "current-password" });
    form.append(el("label", {}, t.username, el("br"), user), el("br"), el("label", {}, t.password, el("br"), pass), el("br"), el("button", { type: "submit" }, t.adminLogin));
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      const r = await fetch(`${homeserver}/_matrix/client/v3/login`, {
        method: "POST",
        body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: user.value.trim() }, password: pass.value }),
      });
      const j = await r.json().catch(() => ({}));
      if (!r.ok) {
        status.textContent = t.adminBadLogin;
        return;
      }
      const probe = await api(homeserver, j.access_token, "GET", "/_synapse/admin/v1/registration_tokens?valid=true");
      if (probe.status === 403) {
        status.textContent = t.adminNotAdmin;
        return;
      }
      sessionStorage.setItem("admin_token", j.access_token);
      form.replaceWith(invites(t, homeserver, j.access_token, status));
    };
    section.append(form);
  }
  section.append(status);
  return section;
}

function invites(t: Texts, homeserver: string, token: string, status: HTMLElement): HTMLElement {
  const box = el("div", { id: "invites" }, el("h3", {}, t.invitesTitle));
  const list = el("ul", { id: "invite-list" });
  const uses = el("input", { name: "invite-uses", type: "number", min: "1", value: "1" });
  const create = el("button", { id: "invite-create", type: "button" }, t.invitesCreate);
  const refresh = async () => {
    const r = await api(homeserver, token, "GET", "/_synapse/admin/v1/registration_tokens?valid=true");
    list.replaceChildren(
      ...(r.json.registration_tokens ?? []).map((x: Token) =>
        el("li", {}, el("code", {}, x.token), ` — ${t.invitesUsed} ${x.completed} ${t.invitesOf} ${x.uses_allowed ?? "∞"}`),
      ),
    );
  };
  create.onclick = async () => {
    const r = await api(homeserver, token, "POST", "/_synapse/admin/v1/registration_tokens/new", { uses_allowed: Number(uses.value) || 1 });
    status.textContent = r.status === 200 ? r.json.token : `${t.errOther} ${r.json.error ?? r.status}`;
    refresh();
  };
  box.append(el("label", {}, t.invitesUses, el("br"), uses), el("br"), create, list);
  refresh();
  return box;
}
