// Registration against the box's homeserver with an invite token (user-interactive auth).

export type RegisterResult = { ok: true; userId: string } | { ok: false; errcode: string; error: string };

async function post(url: string, body: unknown): Promise<{ status: number; json: any }> {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  let json: any = {};
  try {
    json = await r.json();
  } catch {
    /* not JSON */
  }
  return { status: r.status, json };
}

export async function register(homeserver: string, username: string, password: string, token: string): Promise<RegisterResult> {
  const url = `${homeserver}/_matrix/client/v3/register`;
  const first = await post(url, { username, password, inhibit_login: true });
  if (first.status !== 401 || !first.json.session) {
    return { ok: false, errcode: first.json.errcode ?? "M_UNKNOWN", error: first.json.error ?? `HTTP ${first.status}` };
  }
  const stage = token ? "m.login.registration_token" : "m.login.dummy";
  const auth: any = { type: stage, session: first.json.session };
  if (token) auth.token = token;
  const second = await post(url, { username, password, inhibit_login: true, auth });
  if (second.status === 200) return { ok: true, userId: second.json.user_id };
  return { ok: false, errcode: second.json.errcode ?? "M_UNKNOWN", error: second.json.error ?? `HTTP ${second.status}` };
}
