// The admin pages (a chunk of their own, loaded at #admin): log in as a box
// admin, then status, hotspot settings, registration and invite codes,
// connected clients, members (with their sign of joining) and VPN peers.
// They talk to the box's API beside the portal (/api/admin/…) and to the
// homeserver's Synapse-compatible admin API for invite codes.
import type { Texts } from "./i18n";
import { el } from "./dom";

type Ctx = { t: Texts; hs: string; token: string; root: HTMLElement; status: HTMLElement };
type Reply = { status: number; json: any };

const KEY = "admin_token";
export const PAGES = ["status", "hotspot", "invites", "clients", "members", "vpn"] as const;
type Page = (typeof PAGES)[number];

async function call(token: string, method: string, url: string, body?: unknown): Promise<Reply> {
  const r = await fetch(url, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, json: await r.json().catch(() => ({})) };
}

const when = (ms?: number | null) => (ms ? new Date(ms).toLocaleString() : "—");

export function openAdmin(root: HTMLElement, t: Texts, hs: string, page: string, back: () => void) {
  const token = sessionStorage.getItem(KEY);
  if (!token) return login(root, t, hs, page, back);
  const status = el("p", { id: "admin-status", role: "status" });
  const nav = el("nav", { id: "admin-nav" });
  const current = (PAGES as readonly string[]).includes(page) ? (page as Page) : "status";
  for (const p of PAGES) {
    const a = el("a", { href: `#admin/${p}`, "data-page": p }, t.adminPages[p]);
    if (p === current) a.setAttribute("aria-current", "page");
    nav.append(a, " ");
  }
  const logout = el("button", { type: "button", id: "admin-logout" }, t.logout);
  logout.onclick = () => {
    sessionStorage.removeItem(KEY);
    call(token, "POST", `${hs}/_matrix/client/v3/logout`, {}).catch(() => {});
    back();
  };
  const backBtn = el("button", { type: "button" }, t.back);
  backBtn.onclick = back;
  const body = el("section", { id: `admin-${current}` });
  root.replaceChildren(el("p", {}, logout, " ", backBtn), el("h1", {}, t.adminTitle), nav, el("h2", {}, t.adminPages[current]), body, status);
  const ctx: Ctx = { t, hs, token, root: body, status };
  const pages: Record<Page, (c: Ctx) => Promise<void>> = { status: statusPage, hotspot: hotspotPage, invites: invitesPage, clients: clientsPage, members: membersPage, vpn: vpnPage };
  pages[current](ctx).then(
    () => body.setAttribute("data-loaded", "1"),
    (e) => (status.textContent = `${t.errOther} ${e}`),
  );
}

function login(root: HTMLElement, t: Texts, hs: string, page: string, back: () => void) {
  const form = el("form", { id: "admin-login" });
  const user = el("input", { name: "admin-user", required: "", autocomplete: "username" });
  const pass = el("input", { name: "admin-password", type: "password", required: "", autocomplete: "current-password" });
  const status = el("p", { id: "admin-status", role: "status" });
  const backBtn = el("button", { type: "button" }, t.back);
  backBtn.onclick = back;
  form.append(el("h1", {}, t.adminTitle), el("label", {}, t.username, el("br"), user), el("br"), el("label", {}, t.password, el("br"), pass), el("br"), el("button", { type: "submit" }, t.adminLogin), " ", backBtn, status);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const r = await fetch(`${hs}/_matrix/client/v3/login`, {
      method: "POST",
      body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: user.value.trim().toLowerCase() }, password: pass.value, initial_device_display_name: "Secta admin pages" }),
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) {
      status.textContent = r.status === 429 ? t.errRate : t.adminBadLogin;
      return;
    }
    const probe = await call(j.access_token, "GET", "/api/admin/status");
    if (probe.status === 403) {
      status.textContent = t.adminNotAdmin;
      call(j.access_token, "POST", `${hs}/_matrix/client/v3/logout`, {}).catch(() => {});
      return;
    }
    sessionStorage.setItem(KEY, j.access_token);
    openAdmin(root, t, hs, page, back);
  };
  root.replaceChildren(form);
  user.focus();
}

function table(head: string[], rows: (string | Node)[][], id: string) {
  return el(
    "table",
    { id },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))),
  );
}

function yes(t: Texts, v: boolean) {
  return el("span", { class: v ? "ok" : "err" }, v ? t.yes : t.no);
}

async function statusPage({ t, token, root }: Ctx) {
  const s = (await call(token, "GET", "/api/admin/status")).json;
  const procs = (s.hotspot?.processes ?? []).map((p: any) => `${p.name}: ${p.running ? t.running : t.stopped}${p.restarts ? `, ${t.restarts} ${p.restarts}` : ""}`);
  root.append(
    table(
      [t.service, t.state, ""],
      [
        [t.svcHomeserver, yes(t, s.homeserver.running), `${s.homeserver.users} ${t.users}; ${s.homeserver.open_registration ? t.regOpen : t.regInvite}`],
        [t.svcHotspot, yes(t, true), `${s.hotspot.ssid} (${s.hotspot.open ? t.netOpen : t.netClosed}); ${s.hotspot.clients} ${t.clientsWord}, ${s.hotspot.accepted} ${t.acceptedWord}; ${s.hotspot.real ? procs.join("; ") : t.simulated}`],
        [t.svcRadio, yes(t, s.radio.enabled && s.radio.answering), s.radio.enabled ? s.radio.listen : t.off],
        [t.svcVpn, yes(t, s.wireguard.running), s.wireguard.enabled ? `${s.wireguard.members} ${t.peersWord}` : t.off],
      ],
      "status-table",
    ),
    el("p", { class: "sys" }, `${s.box_name} · ${t.version} ${s.version} · ${t.uptime} ${Math.round(s.uptime_secs / 60)} ${t.minutes}`),
  );
  // The duress action: typed confirmation, then the box wipes itself (key first).
  const word = el("input", { name: "wipe-confirm", autocomplete: "off" });
  const button = el("button", { type: "submit", class: "danger" }, t.wipeButton);
  const said = el("p", { id: "wipe-status", role: "status" });
  const form = el("form", { id: "wipe-form" }, el("h2", {}, t.wipeTitle), el("p", {}, t.wipeExplain), el("label", {}, t.wipeConfirm, el("br"), word), " ", button, said);
  form.onsubmit = async (e) => {
    e.preventDefault();
    if (word.value.trim() !== "wipe") {
      said.textContent = t.wipeConfirm;
      return;
    }
    button.disabled = true;
    const r = await call(token, "POST", "/api/admin/wipe", { confirm: "wipe" });
    if (r.status === 202) {
      said.textContent = t.wipeStarted;
      sessionStorage.removeItem(KEY);
    } else {
      said.textContent = `${t.wipeRefused} ${r.json.error ?? r.status}`;
      button.disabled = false;
    }
  };
  root.append(form);
}

async function hotspotPage({ t, token, root, status }: Ctx) {
  const h = (await call(token, "GET", "/api/admin/hotspot")).json;
  const form = el("form", { id: "hotspot-form" });
  const ssid = el("input", { name: "ssid", value: h.ssid, maxlength: "32", required: "" });
  const open = el("input", { type: "checkbox", name: "open" });
  open.checked = h.open;
  const pass = el("input", { name: "passphrase", type: "password", autocomplete: "new-password", placeholder: h.open ? "" : t.unchanged });
  const pass2 = el("input", { name: "passphrase_confirm", type: "password", autocomplete: "new-password" });
  const hidden = el("input", { type: "checkbox", name: "hidden" });
  hidden.checked = h.hidden;
  const channel = el("input", { name: "channel", type: "number", min: "1", max: "165", value: String(h.channel) });
  const country = el("input", { name: "country", value: h.country, maxlength: "2" });
  const session = el("input", { name: "session_minutes", type: "number", min: "0", value: String(h.session_minutes) });
  const about = el("textarea", { name: "about", rows: "4" });
  about.value = h.about;
  const rules = el("textarea", { name: "rules", rows: "6" });
  rules.value = h.rules;
  const problems = el("ul", { id: "hotspot-problems", class: "err" });
  form.append(
    el("label", {}, t.ssid, el("br"), ssid),
    el("label", { class: "check" }, open, t.netOpenLabel),
    el("label", {}, t.wifiPassword, el("br"), pass),
    el("label", {}, t.wifiPasswordAgain, el("br"), pass2),
    el("label", { class: "check" }, hidden, t.hiddenLabel),
    el("label", {}, t.channel, el("br"), channel),
    el("label", {}, t.country, el("br"), country),
    el("label", {}, t.sessionMinutes, el("br"), session),
    el("label", {}, t.aboutLabel, el("br"), about),
    el("label", {}, t.rulesLabel, el("br"), rules),
    el("p", { class: "sys" }, `${h.interface} · ${h.address} · ${h.hostname}`),
    el("button", { type: "submit" }, t.save),
    problems,
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const change: Record<string, unknown> = {
      ssid: ssid.value,
      hidden: hidden.checked,
      channel: Number(channel.value),
      country: country.value,
      session_minutes: Number(session.value),
      about: about.value,
      rules: rules.value,
    };
    if (open.checked) change.open = true;
    else {
      change.open = false;
      if (pass.value || pass2.value) {
        change.passphrase = pass.value;
        change.passphrase_confirm = pass2.value;
      }
    }
    const r = await call(token, "PUT", "/api/admin/hotspot", change);
    problems.replaceChildren(...(r.json.problems ?? []).map((p: string) => el("li", {}, p)));
    if (r.status === 200 && r.json.ok) {
      pass.value = pass2.value = "";
      status.textContent = r.json.reconnect ? t.savedReconnect : t.saved;
    } else {
      status.textContent = r.json.error ? `${t.errOther} ${r.json.error}` : t.notSaved;
    }
  };
  root.append(form);
}

type Token = { token: string; uses_allowed: number | null; completed: number };

async function invitesPage({ t, hs, token, root, status }: Ctx) {
  const mode = el("input", { type: "checkbox", id: "open-registration" });
  mode.checked = !!(await call(token, "GET", "/api/admin/registration")).json.open;
  mode.onchange = async () => {
    const r = await call(token, "PUT", "/api/admin/registration", { open: mode.checked });
    status.textContent = r.status === 200 ? t.saved : `${t.errOther} ${r.json.error ?? r.status}`;
  };
  const list = el("ul", { id: "invite-list" });
  const uses = el("input", { name: "invite-uses", type: "number", min: "1", value: "1" });
  const create = el("button", { id: "invite-create", type: "button" }, t.invitesCreate);
  const code = el("p", { id: "invite-new" });
  const refresh = async () => {
    const r = await call(token, "GET", `${hs}/_synapse/admin/v1/registration_tokens?valid=true`);
    list.replaceChildren(
      ...(r.json.registration_tokens ?? []).map((x: Token) => el("li", {}, el("code", {}, x.token), ` — ${t.invitesUsed} ${x.completed} ${t.invitesOf} ${x.uses_allowed ?? "∞"}`)),
    );
  };
  create.onclick = async () => {
    const r = await call(token, "POST", `${hs}/_synapse/admin/v1/registration_tokens/new`, { uses_allowed: Number(uses.value) || 1 });
    if (r.status === 200) code.replaceChildren(t.invitesNew, " ", el("code", {}, r.json.token));
    else status.textContent = `${t.errOther} ${r.json.error ?? r.status}`;
    await refresh();
  };
  root.append(
    el("label", { class: "check" }, mode, t.regOpenLabel),
    el("h3", {}, t.invitesTitle),
    el("label", {}, t.invitesUses, el("br"), uses),
    create,
    code,
    list,
  );
  await refresh();
}

async function clientsPage({ t, token, root }: Ctx) {
  const c = (await call(token, "GET", "/api/admin/clients")).json.clients ?? [];
  root.append(
    c.length === 0
      ? el("p", { id: "clients-none" }, t.noClients)
      : table(
          [t.ip, t.mac, t.deviceName, t.acceptedCol, t.leaseUntil],
          c.map((x: any) => [x.ip, x.mac ?? "—", x.hostname ?? "—", x.accepted ? when(x.accepted_ms) : t.no, x.lease_expires ? when(x.lease_expires * 1000) : "—"]),
          "clients-table",
        ),
  );
}

async function membersPage({ t, token, root }: Ctx) {
  const m = (await call(token, "GET", "/api/admin/members")).json.members ?? [];
  root.append(
    el("p", { class: "sys" }, t.joiningExplained),
    table(
      [t.member, t.registered, t.rulesAccepted, t.fromDevice, t.firstLogin],
      m.map((u: any) => [
        `${u.user_id}${u.admin ? ` (${t.adminWord})` : ""}`,
        when(u.created_ts),
        u.joining ? when(u.joining.rules_accepted_ms) : "—",
        u.joining ? `${u.joining.ip}${u.joining.mac ? ` / ${u.joining.mac}` : ""}` : "—",
        u.joining ? when(u.joining.first_login_ms) : "—",
      ]),
      "members-table",
    ),
  );
}

async function vpnPage(ctx: Ctx) {
  const { t, token, root, status } = ctx;
  const v = (await call(token, "GET", "/api/admin/vpn")).json;
  const form = el("form", { id: "vpn-add" });
  const name = el("input", { name: "peer-name", required: "", maxlength: "32", placeholder: t.peerNameHint });
  form.append(el("label", {}, t.peerName, el("br"), name), el("button", { type: "submit" }, t.peerAdd));
  const shown = el("div", { id: "vpn-shown" });
  const reload = async () => {
    root.replaceChildren();
    await vpnPage(ctx);
  };
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const r = await call(token, "POST", "/api/admin/vpn", { name: name.value.trim() });
    status.textContent = r.status === 200 ? t.saved : `${t.errOther} ${r.json.error ?? r.status}`;
    if (r.status === 200) await reload();
  };
  const rows = (v.peers ?? []).map((p: any) => {
    const actions = el("span", {});
    const btn = (label: string, cls: string, f: () => Promise<void>) => {
      const b = el("button", { type: "button", class: cls }, label);
      b.onclick = () => f().catch((e) => (status.textContent = `${t.errOther} ${e}`));
      actions.append(b, " ");
    };
    const act = async (method: string, url: string) => {
      const r = await call(token, method, url);
      status.textContent = r.status === 200 ? t.saved : `${t.errOther} ${r.json.error ?? r.status}`;
      if (r.status === 200) await reload();
    };
    const enc = encodeURIComponent(p.name);
    btn(t.peerShow, "peer-show", async () => {
      const get = async (format: string) => {
        const r = await fetch(`/api/admin/vpn/${enc}?format=${format}`, { headers: { authorization: `Bearer ${token}` } });
        if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error ?? `HTTP ${r.status}`);
        return r.blob();
      };
      const [conf, qr] = await Promise.all([get("conf"), get("qr")]);
      const text = await conf.text();
      shown.replaceChildren(
        el("h3", {}, p.name),
        el("img", { class: "qr", id: "peer-qr", alt: `QR ${p.name}`, src: URL.createObjectURL(qr) }),
        el("p", {}, el("a", { id: "peer-download", download: `${p.name}.conf`, href: URL.createObjectURL(new Blob([text], { type: "text/plain" })) }, t.peerDownload)),
        el("pre", { id: "peer-conf" }, text),
      );
    });
    if (p.enabled) btn(t.peerDisable, "peer-disable", () => act("POST", `/api/admin/vpn/${enc}/disable`));
    else btn(t.peerEnable, "peer-enable", () => act("POST", `/api/admin/vpn/${enc}/enable`));
    btn(t.peerRemove, "peer-remove", async () => {
      if (confirm(`${t.peerRemove}: ${p.name}?`)) await act("DELETE", `/api/admin/vpn/${enc}`);
    });
    const seen = p.last_handshake ? when(p.last_handshake * 1000) : t.never;
    return [p.name, p.address, p.active ? t.peerOn : t.peerOff, seen, actions];
  });
  root.append(
    el("p", { class: "sys" }, v.enabled ? (v.running ? t.vpnRunning : t.vpnNotRunning) : t.vpnOff, v.endpoint ? ` · ${v.endpoint}` : ""),
    form,
    rows.length ? table([t.peerName, t.ip, t.state, t.lastHandshake, ""], rows, "vpn-table") : el("p", {}, t.noPeers),
    shown,
  );
}
