// The zero-install web chat: log in, see your rooms and invites, read and
// write in rooms that are not end-to-end encrypted (encrypted messages say to
// open Element). Plain Client-Server API over fetch; loaded only when opened,
// so the welcome page stays small.
import type { Texts } from "./i18n";
import { el } from "./dom";

type Session = { hs: string; token: string; userId: string };
type Ev = { event_id: string; type: string; sender: string; content: any; state_key?: string; origin_server_ts?: number };
type Room = {
  id: string;
  name: string;
  events: Ev[];
  seen: Set<string>;
  names: Map<string, string>;
  prevBatch?: string;
  unread: number;
  invite: boolean;
  encrypted: boolean;
  filled?: boolean;
};


async function call(s: Session, method: string, path: string, body?: unknown, signal?: AbortSignal) {
  const r = await fetch(`${s.hs}${path}`, {
    method,
    headers: { authorization: `Bearer ${s.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  const json = await r.json().catch(() => ({}));
  return { status: r.status, json };
}

const KEY = "chat_session";

export function openChat(root: HTMLElement, t: Texts, hs: string, back: () => void) {
  const saved = localStorage.getItem(KEY);
  const session: Session | null = saved ? JSON.parse(saved) : null;
  if (session && session.hs === hs) chatView(root, t, session, back);
  else loginView(root, t, hs, back);
}

function loginView(root: HTMLElement, t: Texts, hs: string, back: () => void) {
  const form = el("form", { id: "chat-login" });
  const user = el("input", { name: "chat-user", required: "", autocomplete: "username" });
  const pass = el("input", { name: "chat-password", type: "password", required: "", autocomplete: "current-password" });
  const status = el("p", { id: "chat-status", role: "status" });
  const backBtn = el("button", { type: "button", id: "chat-back" }, t.back);
  backBtn.onclick = back;
  form.append(el("h1", {}, t.chatTitle), el("label", {}, t.username, el("br"), user), el("br"), el("label", {}, t.password, el("br"), pass), el("br"), el("button", { type: "submit" }, t.chatLogin), " ", backBtn, status);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const r = await fetch(`${hs}/_matrix/client/v3/login`, {
      method: "POST",
      body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: user.value.trim().toLowerCase() }, password: pass.value, initial_device_display_name: "Secta web chat" }),
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) {
      status.textContent = r.status === 429 ? t.errRate : t.adminBadLogin;
      return;
    }
    const s: Session = { hs, token: j.access_token, userId: j.user_id };
    localStorage.setItem(KEY, JSON.stringify(s));
    chatView(root, t, s, back);
  };
  root.replaceChildren(form);
}

function chatView(root: HTMLElement, t: Texts, s: Session, back: () => void) {
  const rooms = new Map<string, Room>();
  let current: string | null = null;
  // A room just joined or created opens as soon as sync brings it.
  let pending: string | null = null;
  const stop = new AbortController();

  const roomList = el("ul", { id: "rooms" });
  const timeline = el("ol", { id: "timeline" });
  const header = el("h2", { id: "room-name" });
  const roomIdLine = el("code", { id: "room-id" });
  const earlier = el("button", { type: "button", id: "earlier" }, t.loadEarlier);
  const composer = el("form", { id: "composer" });
  const input = el("input", { name: "message", autocomplete: "off", placeholder: t.messagePlaceholder });
  composer.append(input, el("button", { type: "submit" }, t.send));
  const status = el("p", { id: "chat-status", role: "status" });
  const joinForm = el("form", { id: "join-form" });
  const joinInput = el("input", { name: "join-room", placeholder: "#room:server / !id:server" });
  joinForm.append(el("label", {}, t.joinRoom, el("br"), joinInput), el("button", { type: "submit" }, t.join));
  const createForm = el("form", { id: "create-form" });
  const createInput = el("input", { name: "new-room", placeholder: t.newRoomName });
  createForm.append(el("label", {}, t.newRoom, el("br"), createInput), el("button", { type: "submit" }, t.create));
  const logout = el("button", { type: "button", id: "chat-logout" }, t.logout);
  const backBtn = el("button", { type: "button", id: "chat-back" }, t.back);
  backBtn.onclick = () => {
    stop.abort();
    back();
  };
  logout.onclick = async () => {
    stop.abort();
    await call(s, "POST", "/_matrix/client/v3/logout", {}).catch(() => {});
    localStorage.removeItem(KEY);
    back();
  };
  const roomPane = el("section", { id: "room" }, header, roomIdLine, earlier, timeline, composer);
  root.replaceChildren(
    el("p", { id: "me" }, s.userId, " ", logout, " ", backBtn),
    el("h1", {}, t.chatTitle),
    el("nav", {}, el("h2", {}, t.rooms), roomList, joinForm, createForm),
    roomPane,
    status,
  );
  roomPane.hidden = true;

  const room = (id: string): Room => {
    let r = rooms.get(id);
    if (!r) {
      r = { id, name: id, events: [], seen: new Set(), names: new Map(), unread: 0, invite: false, encrypted: false };
      rooms.set(id, r);
    }
    return r;
  };
  const nameOf = (r: Room, user: string) => r.names.get(user) || user.replace(/^@/, "").split(":")[0];
  const learn = (r: Room, e: Ev) => {
    if (e.type === "m.room.member" && e.state_key) {
      if (e.content?.displayname) r.names.set(e.state_key, e.content.displayname);
    } else if (e.type === "m.room.name" && e.content?.name) {
      r.name = e.content.name;
    } else if (e.type === "m.room.encryption") {
      r.encrypted = true;
    }
  };
  const line = (r: Room, e: Ev): HTMLElement | null => {
    const who = nameOf(r, e.sender);
    if (e.type === "m.room.message") {
      const body = typeof e.content?.body === "string" ? e.content.body : "";
      if (!body) return null;
      const text = e.content.msgtype === "m.emote" ? `* ${who} ${body}` : body;
      return el("li", { "data-event": e.event_id }, el("b", {}, who), " ", text);
    }
    if (e.type === "m.room.encrypted") return el("li", { "data-event": e.event_id, class: "sys" }, el("b", {}, who), " ", t.encrypted);
    if (e.type === "m.room.member") {
      const m = e.content?.membership;
      const target = e.state_key ? nameOf(r, e.state_key) : who;
      const what = m === "join" ? t.joined : m === "leave" ? t.left : m === "invite" ? t.invited : null;
      return what ? el("li", { "data-event": e.event_id, class: "sys" }, `${target} ${what}`) : null;
    }
    return null;
  };
  const renderRooms = () => {
    roomList.replaceChildren(
      ...[...rooms.values()].map((r) => {
        const li = el("li", { "data-room": r.id });
        if (r.invite) {
          const accept = el("button", { type: "button", class: "accept-invite" }, t.acceptInvite);
          accept.onclick = async () => {
            const j = await call(s, "POST", `/_matrix/client/v3/join/${encodeURIComponent(r.id)}`, {});
            status.textContent = j.status === 200 ? "" : `${t.errOther} ${j.json.error ?? j.status}`;
          };
          li.append(`${r.name} — ${t.invitation} `, accept);
        } else {
          const a = el("a", { href: "#chat" }, r.name);
          a.onclick = (ev) => {
            ev.preventDefault();
            show(r.id);
          };
          li.append(a);
          if (r.unread > 0 && r.id !== current) li.append(" ", el("span", { class: "unread" }, String(r.unread)));
        }
        return li;
      }),
    );
  };
  const renderTimeline = () => {
    if (!current) return;
    const r = room(current);
    header.textContent = r.name;
    roomIdLine.textContent = r.id;
    earlier.hidden = !r.prevBatch;
    composer.hidden = r.encrypted;
    timeline.replaceChildren(...r.events.map((e) => line(r, e)).filter((x): x is HTMLElement => x !== null));
    if (r.encrypted) timeline.append(el("li", { class: "sys" }, t.encryptedRoom));
    timeline.lastElementChild?.scrollIntoView({ block: "end" });
  };
  const markRead = (r: Room) => {
    const last = r.events[r.events.length - 1];
    if (!last) return;
    r.unread = 0;
    call(s, "POST", `/_matrix/client/v3/rooms/${encodeURIComponent(r.id)}/receipt/m.read/${encodeURIComponent(last.event_id)}`, {}).catch(() => {});
  };
  const show = (id: string) => {
    current = id;
    roomPane.hidden = false;
    renderTimeline();
    markRead(room(id));
    renderRooms();
    fill(room(id));
    input.focus();
  };

  // Older events, before the first one shown (also used to fill a room just joined).
  const loadEarlier = async (r: Room) => {
    if (!r.prevBatch) return;
    const q = `dir=b&limit=30&from=${encodeURIComponent(r.prevBatch)}`;
    const j = await call(s, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(r.id)}/messages?${q}`);
    if (j.status !== 200) return;
    const older: Ev[] = (j.json.chunk ?? []).filter((e: Ev) => !r.seen.has(e.event_id)).reverse();
    for (const e of older) {
      r.seen.add(e.event_id);
      learn(r, e);
    }
    r.events = older.concat(r.events);
    r.prevBatch = j.json.end && older.length > 0 ? j.json.end : undefined;
    renderTimeline();
  };
  earlier.onclick = () => {
    if (current) loadEarlier(room(current));
  };
  // A room with only a few events on screen (just joined, say) shows its recent history.
  const fill = (r: Room) => {
    if (r.events.length < 20 && r.prevBatch && !r.filled) {
      r.filled = true;
      loadEarlier(r);
    }
  };
  composer.onsubmit = async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !current) return;
    input.value = "";
    const txn = `web${Date.now()}${Math.random().toString(36).slice(2, 8)}`;
    const j = await call(s, "PUT", `/_matrix/client/v3/rooms/${encodeURIComponent(current)}/send/m.room.message/${txn}`, { msgtype: "m.text", body: text });
    status.textContent = j.status === 200 ? "" : `${t.errOther} ${j.json.error ?? j.status}`;
    if (j.status !== 200) input.value = text;
  };
  joinForm.onsubmit = async (ev) => {
    ev.preventDefault();
    const target = joinInput.value.trim();
    if (!target) return;
    const j = await call(s, "POST", `/_matrix/client/v3/join/${encodeURIComponent(target)}`, {});
    status.textContent = j.status === 200 ? "" : `${t.errOther} ${j.json.error ?? j.status}`;
    if (j.status === 200) {
      joinInput.value = "";
      pending = j.json.room_id;
    }
  };
  createForm.onsubmit = async (ev) => {
    ev.preventDefault();
    const name = createInput.value.trim();
    if (!name) return;
    // An open room: the web chat cannot read end-to-end encrypted rooms.
    const j = await call(s, "POST", "/_matrix/client/v3/createRoom", { name, preset: "public_chat" });
    status.textContent = j.status === 200 ? "" : `${t.errOther} ${j.json.error ?? j.status}`;
    if (j.status === 200) {
      createInput.value = "";
      pending = j.json.room_id;
    }
  };
  const apply = (sync: any) => {
    for (const [id, v] of Object.entries<any>(sync.rooms?.invite ?? {})) {
      const r = room(id);
      r.invite = true;
      for (const e of v.invite_state?.events ?? []) if (e.type === "m.room.name" && e.content?.name) r.name = e.content.name;
    }
    for (const [id, v] of Object.entries<any>(sync.rooms?.join ?? {})) {
      const r = room(id);
      r.invite = false;
      for (const e of v.state?.events ?? []) learn(r, e);
      const tl: Ev[] = v.timeline?.events ?? [];
      if (v.timeline?.limited && r.events.length > 0) {
        // A gap: start over from what the server sent.
        r.events = [];
        r.seen.clear();
      }
      if (r.events.length === 0 && v.timeline?.prev_batch) r.prevBatch = v.timeline.prev_batch;
      for (const e of tl) {
        learn(r, e);
        if (r.seen.has(e.event_id)) continue;
        r.seen.add(e.event_id);
        r.events.push(e);
      }
      if (r.name === id) {
        const heroes: string[] = v.summary?.["m.heroes"] ?? [];
        if (heroes.length) r.name = heroes.map((h) => nameOf(r, h)).join(", ");
      }
      if (typeof v.unread_notifications?.notification_count === "number") r.unread = v.unread_notifications.notification_count;
      if (id === current && tl.length > 0) markRead(r);
    }
    for (const id of Object.keys(sync.rooms?.leave ?? {})) {
      rooms.delete(id);
      if (current === id) {
        current = null;
        roomPane.hidden = true;
      }
    }
    renderRooms();
    if (pending && rooms.has(pending) && !room(pending).invite) {
      const id = pending;
      pending = null;
      show(id);
    } else {
      renderTimeline();
    }
  };

  const filter = encodeURIComponent(JSON.stringify({ room: { timeline: { limit: 30 }, state: { lazy_load_members: true } }, presence: { types: [] } }));
  (async () => {
    let since = "";
    let failures = 0;
    while (!stop.signal.aborted) {
      const q = since ? `since=${encodeURIComponent(since)}&timeout=30000&filter=${filter}` : `timeout=0&filter=${filter}`;
      try {
        const j = await call(s, "GET", `/_matrix/client/v3/sync?${q}`, undefined, stop.signal);
        if (j.status === 401) {
          localStorage.removeItem(KEY);
          status.textContent = t.sessionEnded;
          return;
        }
        if (j.status !== 200) throw new Error(String(j.status));
        failures = 0;
        status.textContent = "";
        since = j.json.next_batch;
        apply(j.json);
      } catch (e) {
        if (stop.signal.aborted) return;
        failures += 1;
        status.textContent = t.offline;
        await new Promise((r) => setTimeout(r, Math.min(30000, 1000 * 2 ** Math.min(failures, 5))));
      }
    }
  })();
}
