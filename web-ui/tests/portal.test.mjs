// The web app in a real browser (Debian's Chromium driven by playwright-core):
// a newcomer opens the portal, accepts, registers with an invite code; a wrong
// code gets a clear message. Screenshots go to web-ui/test-results/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir, homedir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, "..", "..");
const secta = process.env.SECTA_BIN || join(homedir(), ".cache/secta-target/debug/secta");
const chromium = process.env.CHROMIUM || "/usr/bin/chromium";
const shots = join(here, "..", "test-results");

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitFor(url, ms = 30000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${url} did not come up`);
}

// Starts `secta demo` with the portal; skips (loudly) without Chromium.
async function startBox(t, extra = [], prepare = null) {
  if (!existsSync(chromium)) {
    console.log(`SKIPPED: browser test (${chromium} not installed)`);
    t.skip(`${chromium} not installed`);
    return null;
  }
  assert.ok(existsSync(secta), `secta binary missing at ${secta}: build it first`);
  assert.ok(existsSync(join(repo, "web-ui/dist/index.html")), "web-ui is not built (npm run build)");
  const { chromium: pw } = await import("playwright-core");
  const data = mkdtempSync(join(tmpdir(), "secta-web-"));
  if (prepare) prepare(data);
  const [hsPort, portalPort] = [await freePort(), await freePort()];
  const box = spawn(secta, ["demo", "--data", data, "--listen", `127.0.0.1:${hsPort}`, "--portal-listen", `127.0.0.1:${portalPort}`, ...extra], {
    cwd: repo,
    stdio: "ignore",
  });
  t.after(() => box.kill("SIGKILL"));
  await waitFor(`http://127.0.0.1:${hsPort}/_matrix/client/versions`);
  await waitFor(`http://127.0.0.1:${portalPort}/box.json`);
  const browser = await pw.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  t.after(() => browser.close());
  return { data, hsPort, portalPort, browser };
}

test("newcomer accepts and registers in the browser", async (t) => {
  const started_box = await startBox(t);
  if (!started_box) return;
  const { data, hsPort, portalPort, browser } = started_box;
  const token = execFileSync(secta, ["admin", "--data", data, "invite", "create", "--uses", "1"]).toString().trim().split("\n")[0];

  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  const started = Date.now();
  await page.goto(`http://127.0.0.1:${portalPort}/`, { waitUntil: "load" });
  await page.waitForSelector("#accept");
  const loadMs = Date.now() - started;
  // Bytes the page needed: the document and every resource (from the browser's own accounting).
  const bytes = await page.evaluate(() =>
    performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource")).reduce((n, e) => n + (e.encodedBodySize || 0), 0),
  );
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "1-welcome.png") });
  assert.match(await page.textContent("h1"), /Добро пожаловать/);

  await page.click("#accept");
  await page.waitForSelector("#connected");

  // A wrong invite code: a clear message, nobody created.
  await page.fill("input[name=username]", "natasha");
  await page.fill("input[name=password]", "длинный пароль");
  await page.fill("input[name=invite]", "wrong-code");
  await page.click("form#register button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#status")?.textContent?.includes("Код приглашения не подходит"));
  await page.screenshot({ path: join(shots, "2-bad-code.png") });

  await page.fill("input[name=invite]", token);
  await page.click("form#register button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#status")?.textContent?.includes("@natasha:"));
  await page.screenshot({ path: join(shots, "3-registered.png") });

  // The admin logs in on the same page and makes a new invite code.
  execFileSync(secta, ["admin", "--data", data, "user", "create", "boss", "--password", "admin-pass-1", "--admin"]);
  await page.fill("input[name=admin-user]", "boss");
  await page.fill("input[name=admin-password]", "admin-pass-1");
  await page.click("form#admin-login button[type=submit]");
  await page.waitForSelector("#invite-create");
  await page.fill("input[name=invite-uses]", "2");
  await page.click("#invite-create");
  await page.waitForFunction(() => (document.querySelector("#admin-status")?.textContent ?? "").length > 8);
  const code = (await page.textContent("#admin-status")).trim();
  await page.waitForFunction((c) => document.querySelector("#invite-list")?.textContent?.includes(c), code);
  assert.match(await page.textContent("#invite-list"), /из 2/);
  await page.screenshot({ path: join(shots, "4-admin-invites.png"), fullPage: true });
  // The new code lets someone else in.
  const first = await fetch(`http://127.0.0.1:${hsPort}/_matrix/client/v3/register`, { method: "POST", body: JSON.stringify({ username: "oleg", password: "password-2" }) });
  const session = (await first.json()).session;
  const second = await fetch(`http://127.0.0.1:${hsPort}/_matrix/client/v3/register`, {
    method: "POST",
    body: JSON.stringify({ username: "oleg", password: "password-2", auth: { type: "m.login.registration_token", token: code, session } }),
  });
  assert.equal(second.status, 200);

  // English on request.
  await page.click("#lang");
  assert.match(await page.textContent("h1"), /Welcome/);

  // The account works: log in through the API.
  const login = await fetch(`http://127.0.0.1:${hsPort}/_matrix/client/v3/login`, {
    method: "POST",
    body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: "natasha" }, password: "длинный пароль" }),
  });
  assert.equal(login.status, 200);
  console.log(JSON.stringify({ bench: "portal_first_load", load_ms: loadMs, transferred_bytes: bytes }));
  assert.ok(bytes < 200 * 1024, `first page is ${bytes} bytes`);

  // The new member opens the web chat from the welcome page and is in.
  const before = await page.evaluate(() => performance.getEntriesByType("resource").length);
  const chatStarted = Date.now();
  await page.click("#open-chat");
  await page.waitForSelector("form#chat-login");
  await page.fill("input[name=chat-user]", "natasha");
  await page.fill("input[name=chat-password]", "длинный пароль");
  await page.click("form#chat-login button[type=submit]");
  await page.waitForSelector("#me");
  const chatMs = Date.now() - chatStarted;
  const chatBytes = await page.evaluate(
    (n) => performance.getEntriesByType("resource").slice(n).reduce((sum, e) => sum + (e.encodedBodySize || 0), 0),
    before,
  );
  assert.match(await page.textContent("#me"), /@natasha:/);
  await page.screenshot({ path: join(shots, "5-chat-logged-in.png") });
  console.log(JSON.stringify({ bench: "web_chat_first_load", load_ms: chatMs, transferred_bytes: chatBytes }));
});

test("two members chat in the browser", async (t) => {
  const started_box = await startBox(t);
  if (!started_box) return;
  const { data, hsPort, portalPort, browser } = started_box;
  for (const [name, pass] of [["anya", "anya-pass-1"], ["boris", "boris-pass-1"]]) {
    execFileSync(secta, ["admin", "--data", data, "user", "create", name, "--password", pass]);
  }
  const open = async (user, pass) => {
    const page = await (await browser.newContext({ viewport: { width: 390, height: 844 } })).newPage();
    await page.goto(`http://127.0.0.1:${portalPort}/`, { waitUntil: "load" });
    await page.click("#open-chat");
    await page.fill("input[name=chat-user]", user);
    await page.fill("input[name=chat-password]", pass);
    await page.click("form#chat-login button[type=submit]");
    await page.waitForSelector("#me");
    return page;
  };
  const anya = await open("anya", "anya-pass-1");
  // A wrong password says so and keeps the form.
  const stranger = await (await browser.newContext()).newPage();
  await stranger.goto(`http://127.0.0.1:${portalPort}/#chat`, { waitUntil: "load" });
  await stranger.fill("input[name=chat-user]", "anya");
  await stranger.fill("input[name=chat-password]", "wrong-password");
  await stranger.click("form#chat-login button[type=submit]");
  await stranger.waitForFunction(() => document.querySelector("#chat-status")?.textContent?.includes("Неверное имя или пароль"));

  await anya.fill("input[name=new-room]", "Общая");
  await anya.click("form#create-form button[type=submit]");
  await anya.waitForFunction(() => document.querySelector("#room-name")?.textContent === "Общая");
  const roomId = (await anya.textContent("#room-id")).trim();
  assert.match(roomId, /^!/);
  await anya.fill("#composer input[name=message]", "Привет всем!");
  await anya.click("#composer button[type=submit]");
  await anya.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("Привет всем!"));

  const boris = await open("boris", "boris-pass-1");
  await boris.fill("input[name=join-room]", roomId);
  await boris.click("form#join-form button[type=submit]");
  await boris.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("Привет всем!"));
  await boris.fill("#composer input[name=message]", "Здравствуй, Аня");
  await boris.click("#composer button[type=submit]");
  // Anya sees Boris join and his message arrive live (long-polling sync).
  await anya.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("Здравствуй, Аня"));
  assert.match(await anya.textContent("#timeline"), /boris входит в комнату/);
  await anya.fill("#composer input[name=message]", "Как дела?");
  await anya.click("#composer button[type=submit]");
  await boris.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("Как дела?"));
  mkdirSync(shots, { recursive: true });
  await anya.screenshot({ path: join(shots, "6-chat-anya.png"), fullPage: true });
  await boris.screenshot({ path: join(shots, "7-chat-boris.png"), fullPage: true });

  // Older history comes with "show earlier": 40 more messages through the API, then a fresh login.
  const login = await (await fetch(`http://127.0.0.1:${hsPort}/_matrix/client/v3/login`, {
    method: "POST",
    body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: "anya" }, password: "anya-pass-1" }),
  })).json();
  for (let i = 1; i <= 40; i++) {
    const r = await fetch(`http://127.0.0.1:${hsPort}/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/send/m.room.message/t${i}`, {
      method: "PUT",
      headers: { authorization: `Bearer ${login.access_token}` },
      body: JSON.stringify({ msgtype: "m.text", body: `сообщение ${i}` }),
    });
    assert.equal(r.status, 200);
  }
  await boris.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("сообщение 40"));
  const fresh = await open("boris", "boris-pass-1");
  await fresh.click(`#rooms li[data-room="${roomId}"] a`);
  await fresh.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("сообщение 40"));
  assert.doesNotMatch(await fresh.textContent("#timeline"), /Привет всем!/);
  await fresh.click("#earlier");
  await fresh.waitForFunction(() => document.querySelector("#timeline")?.textContent?.includes("Привет всем!"));
});

// The radio page: a show from a SOURCE client is listed with its title and
// listener count, and plays in the browser's <audio> element.
test("the radio page lists a live show and plays it", async (t) => {
  let ffmpeg = true;
  try {
    execFileSync("ffmpeg", ["-version"], { stdio: "ignore" });
  } catch {
    ffmpeg = false;
  }
  if (!ffmpeg) {
    console.log("SKIPPED: radio browser test (ffmpeg not installed)");
    t.skip("ffmpeg not installed");
    return;
  }
  const radioPort = await freePort();
  const started_box = await startBox(t, ["--radio-listen", `127.0.0.1:${radioPort}`]);
  if (!started_box) return;
  const { data, portalPort, browser } = started_box;
  const { readFileSync } = await import("node:fs");
  const { connect } = await import("node:net");
  const mp3 = join(data, "show.mp3");
  execFileSync("ffmpeg", ["-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=30", "-c:a", "libmp3lame", "-b:a", "128k", mp3]);
  const audio = readFileSync(mp3);
  const password = readFileSync(join(data, "radio/source_password"), "utf8").trim();
  const src = connect(radioPort, "127.0.0.1");
  t.after(() => src.destroy());
  await new Promise((r) => src.once("connect", r));
  const auth = Buffer.from(`source:${password}`).toString("base64");
  src.write(`SOURCE /live HTTP/1.0\r\nAuthorization: Basic ${auth}\r\nContent-Type: audio/mpeg\r\nice-name: Вечерний эфир\r\n\r\n`);
  await new Promise((r) => src.once("data", r));
  // Real time: 16 KB a second (128 kbps), a few seconds ahead.
  let sent = 0;
  const feed = () => {
    const upto = Math.min(audio.length, sent + 16000);
    src.write(audio.subarray(sent, upto));
    sent = upto;
  };
  for (let i = 0; i < 4; i++) feed();
  const timer = setInterval(() => sent < audio.length && feed(), 1000);
  t.after(() => clearInterval(timer));
  const meta = await fetch(`http://127.0.0.1:${radioPort}/admin/metadata?mount=/live&mode=updinfo&song=${encodeURIComponent("Песня про коробку")}`, { headers: { authorization: `Basic ${auth}` } });
  assert.equal(meta.status, 200);

  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await page.goto(`http://127.0.0.1:${portalPort}/`, { waitUntil: "load" });
  await page.click("#open-radio");
  const item = page.locator('li[data-mount="/live"]');
  await item.waitFor();
  assert.match(await item.textContent(), /Вечерний эфир — Песня про коробку/);
  await item.locator("button.play").click();
  await page.waitForFunction(() => document.getElementById("player").currentTime > 0.5, null, { timeout: 20000 });
  assert.equal(await item.locator("button.play").textContent(), "Стоп");
  await page.screenshot({ path: join(shots, "7-radio.png") });
  // The listener count follows on the next refresh.
  const st = await (await fetch(`http://127.0.0.1:${radioPort}/status-json.xsl`)).json();
  const live = [st.icestats.source].flat().find((s) => s.listenurl.endsWith("/live"));
  assert.equal(live.listeners, 1);
});

test("a box that found no first-boot settings says so on its welcome page", async (t) => {
  // What `secta firstboot` leaves when the card had no usable pre-seed file.
  const why = "no secta-preseed.toml on the boot partition";
  const started_box = await startBox(t, [], (data) => writeFileSync(join(data, "setup-needed"), why));
  if (!started_box) return;
  const { portalPort, browser } = started_box;
  const info = await (await fetch(`http://127.0.0.1:${portalPort}/box.json`)).json();
  assert.equal(info.setup_needed, why);
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await page.goto(`http://127.0.0.1:${portalPort}/`, { waitUntil: "load" });
  await page.waitForSelector("#setup-needed");
  const text = await page.textContent("#setup-needed");
  assert.match(text, /Коробка ещё не настроена/);
  assert.ok(text.includes(why));
  await page.click("#lang");
  await page.waitForFunction(() => document.querySelector("#setup-needed")?.textContent?.includes("not set up yet"));
  // The rest of the page still works: registration is there.
  assert.ok(await page.$("form#register"));
});
