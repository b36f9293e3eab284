// The radio page: the box's mounts with what plays now and how many listen,
// played in the browser with a plain <audio> element. Reads the radio's
// Icecast-style /status-json.xsl; loaded only when opened.
import type { Texts } from "./i18n";
import { el } from "./dom";

type Source = { listenurl: string; server_name?: string; title?: string; listeners?: number; server_type?: string };

// `:8000` means "this page's host, that port".
export function radioBase(radio: string): string {
  return radio.startsWith(":") ? `${location.protocol}//${location.hostname}${radio}` : radio;
}

async function sources(base: string): Promise<Source[]> {
  const r = await fetch(`${base}/status-json.xsl`, { cache: "no-store" });
  const s = (await r.json()).icestats?.source;
  return s === undefined ? [] : Array.isArray(s) ? s : [s];
}

export function openRadio(root: HTMLElement, t: Texts, radio: string, back: () => void) {
  const base = radioBase(radio);
  const backBtn = el("button", { id: "radio-back", type: "button" }, t.back);
  backBtn.onclick = back;
  const list = el("ul", { id: "mounts" });
  const status = el("p", { id: "radio-status", role: "status" });
  const audio = el("audio", { id: "player", preload: "none" });
  let playing = "";
  root.replaceChildren(backBtn, el("h1", {}, t.radioTitle), status, list, audio);

  const draw = (all: Source[]) => {
    status.textContent = all.length ? "" : t.radioNothing;
    list.replaceChildren(
      ...all.map((s) => {
        // The mount from the listen URL; the host is ours, as the page sees it.
        const mount = new URL(s.listenurl).pathname;
        const url = `${base}${mount}`;
        const btn = el("button", { type: "button", class: "play" }, playing === url ? t.radioStop : t.radioPlay);
        btn.onclick = () => {
          if (playing === url) {
            audio.pause();
            audio.removeAttribute("src");
            playing = "";
          } else {
            audio.src = url;
            playing = url;
            audio.play().catch(() => (status.textContent = t.radioUnavailable));
          }
          draw(all);
          setTimeout(refresh, 1500);
        };
        return el(
          "li",
          { "data-mount": mount },
          el("strong", {}, s.server_name || mount),
          " — ",
          el("span", { class: "title" }, s.title || "—"),
          " · ",
          el("span", { class: "listeners" }, `${t.radioListeners}: ${s.listeners ?? 0}`),
          " ",
          btn,
        );
      }),
    );
  };

  const refresh = async () => {
    try {
      draw(await sources(base));
    } catch {
      status.textContent = t.radioUnavailable;
    }
  };
  refresh();
  // Refresh while the page is shown; stop once it is replaced.
  const timer = setInterval(() => {
    if (!root.contains(list)) {
      clearInterval(timer);
      audio.pause();
      return;
    }
    refresh();
  }, 10000);
}
