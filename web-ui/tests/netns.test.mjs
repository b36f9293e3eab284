// A phone joining the box's Wi-Fi, end to end, in network namespaces this test
// makes: a "box" running `secta run` with the hotspot (real dnsmasq and
// nftables) and a "phone" that gets a DHCP lease from it and then opens the
// OS probe URL in Chromium — which runs inside the phone's namespace, so its
// DNS and HTTP go through the box exactly as a phone's would.
//
// Benchmark: from the start of the DHCP exchange to the portal page fully
// loaded (lease + probe redirect + page with all its resources), measured in
// one go on one clock. Also: the admin API sees the phone by the MAC in its
// lease, and accepting on the page opens the probe.
//
// Needs root, `ip netns`, dnsmasq, nft, busybox and Chromium; skipped loudly otherwise.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, writeFileSync, readFileSync, rmSync, chmodSync } from "node:fs";
import { tmpdir, homedir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, "..", "..");
const secta = process.env.SECTA_BIN || join(homedir(), ".cache/secta-target/debug/secta");
const chromium = process.env.CHROMIUM || "/usr/bin/chromium";
const shots = join(here, "..", "test-results");
const BOX = "secta-w-box";
const PHONE = "secta-w-phone";

const run = (...args) => spawnSync(args[0], args.slice(1), { encoding: "utf8" });
const must = (...args) => {
  const r = run(...args);
  if (r.status !== 0) throw new Error(`${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
};
const inNs = (ns, ...args) => run("ip", "netns", "exec", ns, ...args);

function skipReason() {
  if (process.getuid?.() !== 0) return "not root";
  for (const f of ["/usr/sbin/dnsmasq", "/usr/sbin/nft", "/usr/bin/busybox", chromium]) if (!existsSync(f)) return `${f} is missing`;
  if (!existsSync(join(repo, "web-ui/dist/index.html"))) return "web-ui is not built";
  const probe = run("ip", "netns", "add", "secta-w-probe");
  if (probe.status !== 0) return `ip netns unavailable: ${probe.stderr.trim()}`;
  const nft = inNs("secta-w-probe", "nft", "list", "tables");
  run("ip", "netns", "del", "secta-w-probe");
  if (nft.status !== 0) return `nft unusable in a namespace: ${nft.stderr.trim()}`;
  return null;
}

async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await f()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("a phone joins the Wi-Fi: lease to portal page, measured in Chromium inside the phone's namespace", async (t) => {
  const why = skipReason();
  if (why) {
    console.log(`SKIPPED: hotspot browser test in network namespaces (${why})`);
    t.skip(why);
    return;
  }
  assert.ok(existsSync(secta), `secta binary missing at ${secta}`);
  const dir = mkdtempSync(join(tmpdir(), "secta-netns-web-"));
  const children = [];
  const cleanup = async () => {
    // SIGTERM first: the box stops its dnsmasq and removes its rules.
    for (const c of children) c.kill("SIGTERM");
    const end = Date.now() + 5000;
    while (children.some((c) => c.exitCode === null && c.signalCode === null) && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
    for (const c of children) c.kill("SIGKILL");
    for (const n of [BOX, PHONE]) run("ip", "netns", "del", n);
    rmSync(`/etc/netns/${PHONE}`, { recursive: true, force: true });
  };
  await cleanup();
  t.after(cleanup);
  for (const n of [BOX, PHONE]) {
    must("ip", "netns", "add", n);
    must("ip", "-n", n, "link", "set", "lo", "up");
  }
  must("ip", "link", "add", "swwlan", "netns", BOX, "type", "veth", "peer", "name", "swphone", "netns", PHONE);
  must("ip", "-n", BOX, "addr", "add", "10.42.0.1/24", "dev", "swwlan");
  must("ip", "-n", BOX, "link", "set", "swwlan", "up");
  must("ip", "-n", PHONE, "link", "set", "swphone", "up");
  const phoneMac = must("ip", "-n", PHONE, "-o", "link", "show", "swphone").match(/link\/ether ([0-9a-f:]{17})/)[1];

  // The box: an offline hotspot (every name answers with the box) serving the web app.
  const data = join(dir, "data");
  const cfg = join(dir, "secta.toml");
  writeFileSync(
    cfg,
    `[box]\ndata_dir = ${JSON.stringify(data)}\nname = "Тест"\nweb_ui_dir = ${JSON.stringify(join(repo, "web-ui/dist"))}\n\n` +
      `[homeserver]\nserver_name = "secta.box"\nlisten = "10.42.0.1:8008"\n\n` +
      `[hotspot]\nenabled = true\ninterface = "swwlan"\nrun_hostapd = false\n`,
  );
  const log = join(dir, "secta.log");
  const box = spawn("ip", ["netns", "exec", BOX, secta, "run", "--config", cfg], { stdio: ["ignore", "ignore", "pipe"] });
  children.push(box);
  let boxLog = "";
  box.stderr.on("data", (d) => (boxLog += d));
  t.after(() => writeFileSync(log, boxLog));
  await until("the box's firewall and dnsmasq", () => inNs(BOX, "nft", "list", "table", "inet", "secta_hotspot").status === 0 && inNs(BOX, "pgrep", "-x", "dnsmasq").status === 0, 30000).catch((e) => {
    throw new Error(`${e.message}\n${boxLog}`);
  });
  await until("the portal", () => inNs(BOX, "busybox", "wget", "-q", "-O", "/dev/null", "http://10.42.0.1/box.json").status === 0);

  // The phone's browser runs in its namespace, started before it joins (as on a phone).
  const wrapper = join(dir, "chromium-in-phone");
  writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${PHONE} ${chromium} "$@"\n`);
  chmodSync(wrapper, 0o755);
  // The lease's DNS server becomes the phone's resolver (what a phone's DHCP client does).
  mkdirSync(`/etc/netns/${PHONE}`, { recursive: true });
  writeFileSync(`/etc/netns/${PHONE}/resolv.conf`, "nameserver 10.42.0.1\n");
  const { chromium: pw } = await import("playwright-core");
  const browser = await pw.launch({
    executablePath: wrapper,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--dns-prefetch-disable"],
  });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });

  // Join: DHCP, then the OS probe, redirected to the portal, loaded in full.
  const script = join(dir, "udhcpc.sh");
  writeFileSync(script, '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface"; ip route add default via "$router"; echo "lease ip=$ip dns=$dns";; esac\n');
  chmodSync(script, 0o755);
  const t0 = performance.now();
  const lease = inNs(PHONE, "busybox", "udhcpc", "-i", "swphone", "-q", "-n", "-t", "10", "-T", "1", "-s", script);
  const t1 = performance.now();
  assert.equal(lease.status, 0, `no lease: ${lease.stdout} ${lease.stderr}`);
  const ip = lease.stdout.match(/lease ip=(\S+)/)[1];
  assert.match(ip, /^10\.42\.0\./);
  const resp = await page.goto("http://connectivitycheck.gstatic.com/generate_204", { waitUntil: "load" });
  await page.waitForSelector("#accept");
  const t2 = performance.now();
  assert.equal(new URL(page.url()).hostname, "secta.box", "the probe leads to the portal");
  assert.ok(resp.request().redirectedFrom(), "the probe was redirected");
  const bytes = await page.evaluate(() =>
    performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource")).reduce((n, e) => n + (e.transferSize || e.encodedBodySize || 0), 0),
  );
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "0-phone-portal.png") });
  const bench = { bench: "lease_to_portal_loaded", lease_ms: Math.round(t1 - t0), page_ms: Math.round(t2 - t1), total_ms: Math.round(t2 - t0), transferred_bytes: bytes, how: "one clock: udhcpc in the phone's namespace, then Chromium (running in that namespace) opens the Android probe URL, is redirected and loads the portal" };
  console.log(JSON.stringify(bench));

  // The box knows the phone by its lease: IP and the veth's real MAC.
  execFileSync("ip", ["netns", "exec", BOX, secta, "admin", "--config", cfg, "user", "create", "boss", "--password", "admin-pass-1", "--admin"]);
  const login = await page.evaluate(async () => {
    const r = await fetch("http://10.42.0.1:8008/_matrix/client/v3/login", { method: "POST", body: JSON.stringify({ type: "m.login.password", identifier: { type: "m.id.user", user: "boss" }, password: "admin-pass-1" }) });
    return (await r.json()).access_token;
  });
  const clients = async () =>
    page.evaluate(async (tok) => (await (await fetch("/api/admin/clients", { headers: { authorization: `Bearer ${tok}` } })).json()).clients, login);
  await until("the lease in the admin's client list", async () => (await clients()).some((c) => c.ip === ip && c.mac === phoneMac), 10000);

  // Accepting on the page: the probe answers exactly as online, and the admin sees it.
  await page.click("#accept");
  await page.waitForSelector("#connected");
  const probe = inNs(PHONE, "busybox", "wget", "-S", "-O", "-", "http://connectivitycheck.gstatic.com/generate_204");
  assert.match(probe.stderr, /204/, probe.stderr);
  const me = (await clients()).find((c) => c.ip === ip);
  assert.ok(me.accepted && me.mac === phoneMac, JSON.stringify(me));

  // An admin on the phone: hiding the Wi-Fi they are connected through is
  // refused; renaming it works and says to reconnect.
  const put = (body) =>
    page.evaluate(async ([tok, b]) => {
      const r = await fetch("/api/admin/hotspot", { method: "PUT", headers: { authorization: `Bearer ${tok}`, "content-type": "application/json" }, body: JSON.stringify(b) });
      return { status: r.status, json: await r.json() };
    }, [login, body]);
  const hide = await put({ hidden: true });
  assert.equal(hide.status, 400);
  assert.match(hide.json.problems.join(" "), /connected through this Wi-Fi/);
  const rename = await put({ ssid: "Коробка-2" });
  assert.equal(rename.status, 200, JSON.stringify(rename.json));
  assert.equal(rename.json.reconnect, true);
  const hostapd = readFileSync(join(data, "hotspot", "hostapd.conf"), "utf8");
  assert.ok(hostapd.includes(`ssid2=${Buffer.from("Коробка-2").toString("hex")}`) && hostapd.includes("ignore_broadcast_ssid=0"), hostapd);
});
