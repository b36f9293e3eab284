// The web chat proper, on matrix-js-sdk (end-to-end encryption by its Rust
// crypto, compiled to WebAssembly and served by the box). Rooms and invites,
// the timeline with images, sending text and images, the box's public rooms,
// new open or encrypted rooms, invitations. Everything from other people is put
// on the page as text nodes or object URLs of fetched blobs (see dom.ts).
import {
  ClientEvent,
  createClient,
  EventType,
  MatrixEventEvent,
  MsgType,
  NotificationCountType,
  Preset,
  RoomEvent,
  RoomMemberEvent,
  Visibility,
  type MatrixClient,
  type MatrixEvent,
  type Room,
} from "matrix-js-sdk";
import type { Texts } from "./i18n";
import { el } from "./dom";
import { forgetSession, type Session } from "./chat";
import { decryptAttachment, encryptAttachment, type EncryptedFile } from "./attachments";

const MAX_IMAGE_BYTES = 20 * 1024 * 1024;

// The SDK logs a lot at debug level; old phones pay for every line.
const noop = () => {};
const quiet: any = { trace: noop, debug: noop, info: noop, warn: console.warn, error: console.error, getChild: () => quiet };

export async function chatView(root: HTMLElement, t: Texts, s: Session, password: string | null, back: () => void) {
  const client = createClient({ baseUrl: s.hs, accessToken: s.token, userId: s.userId, deviceId: s.deviceId, timelineSupport: true, logger: quiet });
  const status = el("p", { id: "chat-status", role: "status" });
  try {
    await client.initRustCrypto({ cryptoDatabasePrefix: `secta-${s.deviceId}` });
  } catch (e) {
    // The web chat still works for rooms without encryption.
    console.warn("end-to-end encryption unavailable", e);
  }
  let current: string | null = null;
  let pending: string | null = null;
  // The room and last event the timeline last scrolled to.
  let lastShown = "";
  let stopped = false;

  const roomList = el("ul", { id: "rooms" });
  const publicList = el("ul", { id: "public-rooms" });
  const timeline = el("ol", { id: "timeline" });
  const header = el("h2", { id: "room-name" });
  const lock = el("p", { id: "room-e2ee", class: "sys" });
  const roomIdLine = el("code", { id: "room-id" });
  const earlier = el("button", { type: "button", id: "earlier" }, t.loadEarlier);
  const composer = el("form", { id: "composer" });
  const input = el("input", { name: "message", autocomplete: "off", placeholder: t.messagePlaceholder });
  composer.append(input, el("button", { type: "submit" }, t.send));
  const attach = el("input", { id: "attach", name: "attach", type: "file", accept: "image/*" });
  const attachLabel = el("label", { class: "attach" }, t.sendImage, " ", attach);
  const inviteForm = el("form", { id: "invite-form" });
  const inviteInput = el("input", { name: "invite-user", placeholder: "@name:server" });
  inviteForm.append(el("label", {}, t.inviteUser, el("br"), inviteInput), el("button", { type: "submit" }, t.inviteSend));
  const joinForm = el("form", { id: "join-form" });
  const joinInput = el("input", { name: "join-room", placeholder: "#room:server / !id:server" });
  joinForm.append(el("label", {}, t.joinRoom, el("br"), joinInput), el("button", { type: "submit" }, t.join));
  const createForm = el("form", { id: "create-form" });
  const createInput = el("input", { name: "new-room", placeholder: t.newRoomName });
  const privateBox = el("input", { type: "checkbox", name: "new-room-private" });
  createForm.append(
    el("label", {}, t.newRoom, el("br"), createInput),
    el("label", { class: "check" }, privateBox, " ", t.newRoomPrivate),
    el("button", { type: "submit" }, t.create),
  );
  const logout = el("button", { type: "button", id: "chat-logout" }, t.logout);
  const backBtn = el("button", { type: "button", id: "chat-back" }, t.back);
  const stop = () => {
    stopped = true;
    client.stopClient();
  };
  backBtn.onclick = () => {
    stop();
    back();
  };
  logout.onclick = async () => {
    stop();
    await client.logout(true).catch(() => {});
    await client.clearStores().catch(() => {});
    forgetSession();
    back();
  };
  const roomPane = el("section", { id: "room" }, header, lock, roomIdLine, earlier, timeline, composer, attachLabel, inviteForm);
  root.replaceChildren(
    el("p", { id: "me" }, s.userId, " ", logout, " ", backBtn),
    el("h1", {}, t.chatTitle),
    status,
    roomPane,
    el("nav", {}, el("h2", {}, t.rooms), roomList, el("h3", {}, t.publicRooms), publicList, joinForm, createForm),
  );
  roomPane.hidden = true;
  const say = (text: string) => {
    status.textContent = text;
  };
  const fail = (e: any) => say(`${t.errOther} ${e?.data?.error ?? e?.message ?? e}`);

  // --- media (authenticated downloads; encrypted ones decrypted here) ---
  const blobs = new Map<string, Promise<string>>();
  const fetchMedia = (key: string, url: string, file?: EncryptedFile, mimetype?: string) => {
    let p = blobs.get(key);
    if (!p) {
      p = (async () => {
        const r = await fetch(url, { headers: { authorization: `Bearer ${s.token}` } });
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        let bytes = new Uint8Array(await r.arrayBuffer());
        if (file) bytes = decryptAttachment(bytes, file) as Uint8Array<ArrayBuffer>;
        const type = mimetype && /^image\/(png|jpeg|gif|webp)$/.test(mimetype) ? mimetype : "application/octet-stream";
        return URL.createObjectURL(new Blob([bytes], { type }));
      })();
      blobs.set(key, p);
    }
    return p;
  };
  const image = (e: MatrixEvent, content: any): HTMLElement => {
    const img = el("img", { alt: typeof content.body === "string" ? content.body : "", class: "msg-image" });
    const file: EncryptedFile | undefined = content.file;
    const mxc: string | undefined = file ? file.url : content.url;
    const mimetype = content.info?.mimetype;
    const url =
      typeof mxc === "string" && mxc.startsWith("mxc://")
        ? file
          ? client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true)
          : client.mxcUrlToHttp(mxc, 640, 480, "scale", false, true, true)
        : null;
    if (url) {
      fetchMedia(e.getId() ?? mxc!, url, file, typeof mimetype === "string" ? mimetype : "image/png")
        .then((src) => {
          img.src = src;
          img.dataset.loaded = "1";
        })
        .catch(() => img.replaceWith(el("span", { class: "sys" }, t.imageFailed)));
    }
    return img;
  };

  // --- rendering ---
  const nameOf = (room: Room, user: string) => room.getMember(user)?.name || user.replace(/^@/, "").split(":")[0];
  const line = (room: Room, e: MatrixEvent): HTMLElement | null => {
    const id = e.getId() ?? "";
    const who = nameOf(room, e.getSender() ?? "");
    if (e.isDecryptionFailure()) return el("li", { "data-event": id, class: "sys" }, el("b", {}, who), " ", t.undecryptable);
    if (e.isBeingDecrypted() || e.shouldAttemptDecryption()) return el("li", { "data-event": id, class: "sys" }, el("b", {}, who), " ", t.decrypting);
    const type = e.getType();
    const content = e.getContent();
    const locked = e.isEncrypted() ? "🔒 " : "";
    if (type === EventType.RoomMessage) {
      if (content.msgtype === MsgType.Image) {
        return el("li", { "data-event": id, class: "image" }, el("b", {}, who), " ", locked, image(e, content));
      }
      const body = typeof content.body === "string" ? content.body : "";
      if (!body) return null;
      const text = content.msgtype === MsgType.Emote ? `* ${who} ${body}` : body;
      return el("li", { "data-event": id }, el("b", {}, who), " ", locked, text);
    }
    if (type === EventType.RoomMember) {
      const m = content.membership;
      const target = e.getStateKey() ? nameOf(room, e.getStateKey()!) : who;
      const what = m === "join" ? t.joined : m === "leave" ? t.left : m === "invite" ? t.invited : null;
      return what && e.getPrevContent()?.membership !== m ? el("li", { "data-event": id, class: "sys" }, `${target} ${what}`) : null;
    }
    if (type === EventType.RoomEncryption) return el("li", { "data-event": id, class: "sys" }, t.encryptionOn);
    return null;
  };
  const visibleRooms = () =>
    client
      .getRooms()
      .filter((r) => ["join", "invite"].includes(r.getMyMembership()))
      .sort((a, b) => b.getLastActiveTimestamp() - a.getLastActiveTimestamp());
  const renderRooms = () => {
    roomList.replaceChildren(
      ...visibleRooms().map((r) => {
        const li = el("li", { "data-room": r.roomId });
        const locked = r.hasEncryptionStateEvent() ? "🔒 " : "";
        if (r.getMyMembership() === "invite") {
          const accept = el("button", { type: "button", class: "accept-invite" }, t.acceptInvite);
          accept.onclick = () => {
            pending = r.roomId;
            client.joinRoom(r.roomId).then(() => say(""), fail);
          };
          li.append(`${locked}${r.name} — ${t.invitation} `, accept);
        } else {
          const a = el("a", { href: "#chat" }, locked, r.name);
          a.onclick = (ev) => {
            ev.preventDefault();
            show(r.roomId);
          };
          li.append(a);
          const unread = r.getUnreadNotificationCount(NotificationCountType.Total);
          if (unread > 0 && r.roomId !== current) li.append(" ", el("span", { class: "unread" }, String(unread)));
        }
        return li;
      }),
    );
  };
  const renderTimeline = () => {
    if (!current) return;
    const room = client.getRoom(current);
    if (!room) return;
    header.textContent = room.name;
    roomIdLine.textContent = room.roomId;
    lock.textContent = room.hasEncryptionStateEvent() ? t.roomEncrypted : t.roomOpen;
    const events = room.getLiveTimeline().getEvents();
    earlier.hidden = room.getLiveTimeline().getPaginationToken("b" as any) === null;
    timeline.replaceChildren(...events.map((e) => line(room, e)).filter((x): x is HTMLElement => x !== null));
    // Follow new messages at the end (not when earlier ones are added above).
    const last = `${room.roomId}/${events[events.length - 1]?.getId() ?? ""}`;
    if (last !== lastShown) {
      lastShown = last;
      timeline.lastElementChild?.scrollIntoView({ block: "end" });
    }
  };
  let scheduled = false;
  const render = () => {
    if (scheduled || stopped) return;
    scheduled = true;
    setTimeout(() => {
      scheduled = false;
      renderRooms();
      renderDirectory();
      renderTimeline();
      if (pending) {
        const r = client.getRoom(pending);
        if (r && r.getMyMembership() === "join") {
          pending = null;
          show(r.roomId);
        }
      }
    }, 30);
  };
  const markRead = (room: Room) => {
    const events = room.getLiveTimeline().getEvents();
    const last = events[events.length - 1];
    if (last && last.getId()?.startsWith("$")) client.sendReadReceipt(last).catch(() => {});
  };
  const show = (id: string) => {
    current = id;
    roomPane.hidden = false;
    const room = client.getRoom(id);
    renderTimeline();
    renderRooms();
    if (room) {
      markRead(room);
      if (room.getLiveTimeline().getEvents().length < 20) client.scrollback(room, 30).then(render, () => {});
    }
    input.focus();
  };
  // The box's public rooms (refreshed on start and after creating one); the
  // join buttons follow membership on every render.
  let directory: { room_id: string; name?: string; canonical_alias?: string; num_joined_members: number }[] = [];
  const renderDirectory = () => {
    if (directory.length === 0) {
      publicList.replaceChildren(el("li", { class: "sys" }, t.noPublicRooms));
      return;
    }
    publicList.replaceChildren(
      ...directory.map((p) => {
        const li = el("li", { "data-room": p.room_id }, p.name || p.canonical_alias || p.room_id, ` (${p.num_joined_members})`);
        if (client.getRoom(p.room_id)?.getMyMembership() !== "join") {
          const b = el("button", { type: "button", class: "join-public" }, t.join);
          b.onclick = () => {
            pending = p.room_id;
            client.joinRoom(p.room_id).then(() => say(""), fail);
          };
          li.append(" ", b);
        }
        return li;
      }),
    );
  };
  const renderPublic = async () => {
    try {
      directory = (await client.publicRooms({ limit: 50 })).chunk;
      renderDirectory();
    } catch {
      /* the directory is optional */
    }
  };

  // --- actions ---
  earlier.onclick = () => {
    const room = current && client.getRoom(current);
    if (room) client.scrollback(room, 30).then(render, fail);
  };
  composer.onsubmit = async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !current) return;
    input.value = "";
    try {
      await client.sendMessage(current, { msgtype: MsgType.Text, body: text });
      say("");
    } catch (e) {
      input.value = text;
      fail(e);
    }
  };
  attach.onchange = async () => {
    const f = attach.files?.[0];
    attach.value = "";
    if (!f || !current) return;
    if (!f.type.startsWith("image/")) return say(t.notAnImage);
    if (f.size > MAX_IMAGE_BYTES) return say(t.imageTooBig);
    const roomId = current;
    say(t.sendingImage);
    try {
      const bytes = new Uint8Array(await f.arrayBuffer());
      const info: Record<string, unknown> = { mimetype: f.type, size: f.size };
      try {
        const bmp = await createImageBitmap(f);
        info.w = bmp.width;
        info.h = bmp.height;
        bmp.close();
      } catch {
        /* not decodable here: send without dimensions */
      }
      const content: Record<string, unknown> = { msgtype: MsgType.Image, body: f.name || "image", info };
      if (client.getRoom(roomId)?.hasEncryptionStateEvent()) {
        const enc = encryptAttachment(bytes);
        const up = await client.uploadContent(new Blob([enc.data as Uint8Array<ArrayBuffer>], { type: "application/octet-stream" }), { includeFilename: false });
        content.file = { ...enc.info, url: up.content_uri };
      } else {
        const up = await client.uploadContent(f, { type: f.type, name: f.name });
        content.url = up.content_uri;
      }
      await client.sendMessage(roomId, content as any);
      say("");
    } catch (e) {
      fail(e);
    }
  };
  inviteForm.onsubmit = async (ev) => {
    ev.preventDefault();
    const who = inviteInput.value.trim();
    if (!who || !current) return;
    try {
      await client.invite(current, who);
      inviteInput.value = "";
      say(t.invitedOk);
    } catch (e) {
      fail(e);
    }
  };
  joinForm.onsubmit = async (ev) => {
    ev.preventDefault();
    const target = joinInput.value.trim();
    if (!target) return;
    try {
      const room = await client.joinRoom(target);
      joinInput.value = "";
      pending = room.roomId;
      say("");
      render();
    } catch (e) {
      fail(e);
    }
  };
  createForm.onsubmit = async (ev) => {
    ev.preventDefault();
    const name = createInput.value.trim();
    if (!name) return;
    const encrypted = privateBox.checked;
    try {
      const r = await client.createRoom(
        encrypted
          ? {
              name,
              preset: Preset.PrivateChat,
              initial_state: [{ type: EventType.RoomEncryption, state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
            }
          : { name, preset: Preset.PublicChat, visibility: Visibility.Public },
      );
      createInput.value = "";
      pending = r.room_id;
      say("");
      render();
      if (!encrypted) renderPublic();
    } catch (e) {
      fail(e);
    }
  };

  // --- live updates ---
  client.on(RoomEvent.Timeline, (_e, room) => {
    if (room && room.roomId === current && !document.hidden) markRead(room);
    render();
  });
  client.on(MatrixEventEvent.Decrypted, render);
  client.on(RoomEvent.Name, render);
  client.on(RoomEvent.MyMembership, render);
  client.on(RoomMemberEvent.Name, render);
  client.on(ClientEvent.Sync, (state) => {
    if (state === "PREPARED") {
      say("");
      root.dataset.ready = "1";
      render();
      renderPublic();
    } else if (state === "ERROR" || state === "RECONNECTING") {
      say(t.offline);
    } else if (state === "SYNCING") {
      if (status.textContent === t.offline) say("");
      render();
    }
  });
  client.on(ClientEvent.Event, (e) => {
    // The token was revoked elsewhere.
    if (e.getType() === "m.session_ended") forgetSession();
  });
  client.on("Session.logged_out" as any, () => {
    stop();
    forgetSession();
    say(t.sessionEnded);
  });

  await client.startClient({ initialSyncLimit: 30, lazyLoadMembers: true });
  if (password) setUpCrossSigning(client, s.userId, password);
}

/** A first login on an account without cross-signing sets it up, so other
 * members' apps see this device as its owner's. */
async function setUpCrossSigning(client: MatrixClient, userId: string, password: string) {
  const crypto = client.getCrypto();
  if (!crypto) return;
  try {
    if (await crypto.userHasCrossSigningKeys(userId, true)) return;
    await crypto.bootstrapCrossSigning({
      authUploadDeviceSigningKeys: async (makeRequest) => {
        await makeRequest({ type: "m.login.password", identifier: { type: "m.id.user", user: userId }, password });
      },
    });
  } catch (e) {
    console.warn("cross-signing set-up failed", e);
  }
}
