// The virtual panel (demo mode): the box's LED strip and its buttons, driven
// by the box's own panel code through its HTTP endpoint. The strip shown is
// what the simulated strip's SPI bus received, decoded; holding a button here
// holds the simulated one. Loaded only when opened.
import type { Texts } from "./i18n";
import { el } from "./dom";

type PanelState = {
  version: string;
  frame: string[];
  rows: string[];
  buttons: { name: string; pressed: boolean }[];
  simulated: boolean;
  status: { wipe: { state: string; remaining_ms?: number } };
};

export function panelBase(panel: string): string {
  return panel.startsWith(":") ? `${location.protocol}//${location.hostname}${panel}` : panel;
}

export function openPanel(root: HTMLElement, t: Texts, panel: string, back: () => void) {
  const base = panelBase(panel);
  const backBtn = el("button", { id: "panel-back", type: "button" }, t.back);
  backBtn.onclick = back;
  const strip = el("div", { id: "strip", role: "img" });
  const state = el("p", { id: "panel-state", role: "status" });
  const buttons = el("div", { id: "panel-buttons" });
  // Buttons above the text that changes, so they never move under a finger.
  root.replaceChildren(backBtn, el("h1", {}, t.panelTitle), strip, buttons, el("p", {}, t.panelHold), state);

  const press = (i: number, pressed: boolean) =>
    fetch(`${base}/panel/buttons/${i}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ pressed }),
    }).catch(() => undefined);

  // The strip's colours are brightness-limited; show them at full strength
  // (same hue) so they can be told apart on a screen.
  const shown = (c: string) => {
    const v = [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
    const m = Math.max(...v);
    return m === 0 ? "#222" : `rgb(${v.map((x) => Math.round((x * 255) / m)).join(",")})`;
  };
  let drawnButtons = "";
  const draw = (s: PanelState) => {
    strip.replaceChildren(
      ...s.frame.map((c, i) => el("span", { class: "led", "data-led": String(i), "data-color": c, style: `background:${shown(c)};color:${shown(c)}` })),
    );
    strip.setAttribute("aria-label", s.rows.join(", "));
    const wipe = s.status.wipe;
    const rows = s.rows.map((r) => `${t.panelRows[r] ?? r} (${r})`);
    state.textContent = `${t.panelState} ${rows.join(", ")}${wipe.remaining_ms !== undefined ? ` (${(wipe.remaining_ms / 1000).toFixed(1)} s)` : ""}`;
    const names = s.buttons.map((b) => b.name).join(",");
    if (s.simulated && names !== drawnButtons) {
      drawnButtons = names;
      buttons.replaceChildren(
        el("p", {}, t.panelSimulated),
        ...s.buttons.map((b, i) => {
          const btn = el("button", { type: "button", class: "panel-button", "data-button": b.name }, b.name === "panic" ? "Тревога / Panic" : b.name);
          btn.onpointerdown = () => press(i, true);
          btn.onpointerup = () => press(i, false);
          btn.onpointerleave = () => press(i, false);
          return btn;
        }),
      );
    }
  };

  // Long-poll: the endpoint answers when the strip or the state changed.
  let version = "";
  const loop = async () => {
    while (root.contains(strip)) {
      try {
        const r = await fetch(`${base}/panel?since=${encodeURIComponent(version)}`, { cache: "no-store" });
        const s: PanelState = await r.json();
        version = s.version;
        draw(s);
      } catch {
        state.textContent = t.offline;
        await new Promise((res) => setTimeout(res, 1000));
      }
    }
  };
  loop();
}
