// Sign-up through the box's portal (/api/register): the portal checks the
// password, the invite code and how often this device tried, records the sign
// of joining (rules accepted, from which device) and creates the account.

export type RegisterResult = { ok: true; userId: string } | { ok: false; errcode: string; error: string; reason: string };

export async function register(username: string, password: string, invite: string, acceptRules: boolean): Promise<RegisterResult> {
  const r = await fetch("/api/register", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username, password, invite, accept_rules: acceptRules }),
  });
  const json: any = await r.json().catch(() => ({}));
  if (r.ok && typeof json.user_id === "string") return { ok: true, userId: json.user_id };
  return { ok: false, errcode: json.errcode ?? "M_UNKNOWN", error: json.error ?? `HTTP ${r.status}`, reason: r.headers.get("x-secta-reason") ?? "" };
}
