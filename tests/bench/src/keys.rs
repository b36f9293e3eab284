//! `--scenario keys`: end-to-end encryption keys.
//!
//! Users log in several devices each (password login with a chosen `device_id`). Every device
//! uploads device keys and signed one-time keys, signed with a real ed25519 key over canonical
//! JSON, as the server checks. Then the bench times `/keys/query` (one user asking for every
//! user, and many small queries) and `/keys/claim` (one key per device of a user, concurrently),
//! and checks what comes back: signatures, uniqueness of claimed keys, remaining key counts.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Instant,
};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};

use crate::{
    idle_and_register, median, ms, round3, run_bounded, summary, Ctx, Method, Registered,
    REQ_TIMEOUT,
};

const UPLOAD: &str = "/_matrix/client/v3/keys/upload";
const QUERY: &str = "/_matrix/client/v3/keys/query";
const CLAIM: &str = "/_matrix/client/v3/keys/claim";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// Canonical JSON of `v` without `signatures` and `unsigned`: serde_json's `Map` is a `BTreeMap`
/// (the `preserve_order` feature is off), so keys come out sorted, and `to_string` is compact.
/// The objects signed here hold only strings, arrays and objects (no floats).
fn canonical_for_signing(v: &Value) -> String {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    v.to_string()
}

fn sign(v: &mut Value, key: &SigningKey, user: &str, key_id: &str) {
    let sig = key.sign(canonical_for_signing(v).as_bytes());
    v["signatures"][user][key_id] = json!(b64(&sig.to_bytes()));
}

/// Whether `v` carries a valid signature `signatures.{user}.{key_id}` by `public_b64`.
fn verify(v: &Value, user: &str, key_id: &str, public_b64: &str) -> bool {
    let Some(sig) = v["signatures"][user][key_id].as_str() else {
        return false;
    };
    let (Some(sig), Some(pk)) = (unb64(sig), unb64(public_b64)) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&sig) else {
        return false;
    };
    let Ok(pk) = <[u8; 32]>::try_from(pk.as_slice()) else {
        return false;
    };
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    vk.verify(canonical_for_signing(v).as_bytes(), &sig).is_ok()
}

fn random_key() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b64(&b)
}

/// One logged-in device and what it uploaded.
struct Device {
    user: usize,
    user_id: String,
    device_id: String,
    token: String,
    /// The device's ed25519 public key (unpadded base64).
    ed25519: String,
    /// One-time key id (`signed_curve25519:…`) → curve25519 key.
    otks: BTreeMap<String, String>,
    /// Body of its POST /keys/upload, signed beforehand so signing is not timed.
    upload: Value,
}

/// Device keys and `n` signed one-time keys for a device, signed by a fresh ed25519 key.
/// Returns (upload body, ed25519 public key, one-time keys).
fn make_keys(
    user_id: &str,
    device_id: &str,
    n: usize,
) -> (Value, String, BTreeMap<String, String>) {
    let signing = SigningKey::generate(&mut OsRng);
    let ed = b64(signing.verifying_key().as_bytes());
    let key_id = format!("ed25519:{device_id}");
    let mut dk = json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device_id}"): random_key(),
            key_id.clone(): ed,
        },
    });
    sign(&mut dk, &signing, user_id, &key_id);
    let mut otks = BTreeMap::new();
    let mut otk_json = serde_json::Map::new();
    for i in 0..n {
        // Key ids as libolm makes them: base64 of a counter.
        let id = format!("signed_curve25519:{}", b64(&(i as u32 + 1).to_be_bytes()));
        let key = random_key();
        let mut o = json!({ "key": key });
        sign(&mut o, &signing, user_id, &key_id);
        otks.insert(id.clone(), key);
        otk_json.insert(id, o);
    }
    (
        json!({ "device_keys": dk, "one_time_keys": otk_json }),
        ed,
        otks,
    )
}

async fn login(ctx: &Ctx, reg: &Registered, device_id: &str) -> Option<(String, String)> {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": reg.username },
        "password": reg.password,
        "device_id": device_id,
        "initial_device_display_name": "secta-bench",
    });
    let v = ctx
        .http
        .call(
            "login",
            Method::Post,
            "/_matrix/client/v3/login",
            None,
            Some(&body),
            REQ_TIMEOUT,
        )
        .await?;
    let token = v.get("access_token")?.as_str()?.to_owned();
    let dev = v
        .get("device_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if dev != device_id {
        ctx.http
            .count_with_sample("login", "2xx other device_id", &v.to_string());
    }
    Some((v.get("user_id")?.as_str()?.to_owned(), token))
}

pub async fn run(ctx: Arc<Ctx>, secret: String) {
    let a = &ctx.args;
    let (n_users, n_dev, n_otk) = (a.users, a.devices.max(1), a.one_time_keys);
    ctx.set("users", n_users);
    ctx.set("devices_per_user", n_dev);
    ctx.set("one_time_keys_per_device", n_otk);
    let users = idle_and_register(&ctx, &secret, n_users).await;
    if users.iter().all(Option::is_none) {
        ctx.progress("no users: stopping");
        return;
    }

    // 1. Logins: one per device, with a chosen device id.
    ctx.progress(format!("logging in {n_dev} devices for each user"));
    let t = Instant::now();
    let mut futs = Vec::new();
    for (u, reg) in users.iter().enumerate() {
        let Some(reg) = reg.clone() else { continue };
        for d in 0..n_dev {
            let (ctx, reg) = (ctx.clone(), reg.clone());
            futs.push(async move {
                let device_id = format!("BENCH{}D{d}", ctx.run.to_uppercase());
                let t = Instant::now();
                let (user_id, token) = login(&ctx, &reg, &device_id).await?;
                Some((u, user_id, device_id, token, ms(t.elapsed())))
            });
        }
    }
    let logins = run_bounded(&ctx, a.setup_concurrency, futs).await;
    let login_lat: Vec<f64> = logins.iter().flatten().map(|l| l.4).collect();
    ctx.set("logins_ok", login_lat.len());
    ctx.set("login_ms", summary(&login_lat));
    ctx.set("login_wall_ms", round3(ms(t.elapsed())));
    ctx.progress(format!(
        "{}/{} logins in {:.1}s",
        login_lat.len(),
        n_users * n_dev,
        t.elapsed().as_secs_f64()
    ));

    // 2. Keys, generated and signed before anything is timed.
    let t = Instant::now();
    let devices: Vec<Arc<Device>> = logins
        .into_iter()
        .flatten()
        .map(|(user, user_id, device_id, token, _)| {
            let (upload, ed25519, otks) = make_keys(&user_id, &device_id, n_otk);
            Arc::new(Device {
                user,
                user_id,
                device_id,
                token,
                ed25519,
                otks,
                upload,
            })
        })
        .collect();
    ctx.set("bench_keygen_ms", round3(ms(t.elapsed())));
    if devices.is_empty() {
        ctx.progress("no devices: stopping");
        return;
    }

    // 3. Uploads: device keys and one-time keys, one request per device.
    ctx.progress(format!("uploading keys of {} devices", devices.len()));
    let t = Instant::now();
    let futs: Vec<_> = devices
        .iter()
        .map(|d| {
            let (ctx, d) = (ctx.clone(), d.clone());
            async move {
                let t = Instant::now();
                let v = ctx
                    .http
                    .call(
                        "keys_upload",
                        Method::Post,
                        UPLOAD,
                        Some(&d.token),
                        Some(&d.upload),
                        REQ_TIMEOUT,
                    )
                    .await?;
                let dt = ms(t.elapsed());
                Some((
                    dt,
                    v.pointer("/one_time_key_counts/signed_curve25519")
                        .and_then(Value::as_u64),
                ))
            }
        })
        .collect();
    let uploads = run_bounded(&ctx, a.setup_concurrency, futs).await;
    let up_lat: Vec<f64> = uploads.iter().flatten().map(|x| x.0).collect();
    let count_wrong = uploads
        .iter()
        .flatten()
        .filter(|x| x.1 != Some(n_otk as u64))
        .count();
    // Devices whose upload succeeded: only they take part in queries and claims.
    let uploaded: Vec<Arc<Device>> = devices
        .iter()
        .zip(&uploads)
        .filter(|(_, u)| u.is_some())
        .map(|(d, _)| d.clone())
        .collect();
    ctx.set("keys_upload_ms", summary(&up_lat));
    ctx.set("keys_upload_wall_ms", round3(ms(t.elapsed())));
    ctx.set("keys_uploads_ok", up_lat.len());
    ctx.set("keys_upload_count_mismatch", count_wrong);
    ctx.set("rss_after_upload_kb", ctx.rss_kb());
    ctx.progress(format!(
        "{}/{} uploads ok in {:.1}s",
        up_lat.len(),
        devices.len(),
        t.elapsed().as_secs_f64()
    ));

    // The server must refuse device keys signed by another key (user 0's registration device).
    if let Some(reg) = users.iter().flatten().next() {
        if let Some(dev) = ctx
            .http
            .call(
                "whoami",
                Method::Get,
                "/_matrix/client/v3/account/whoami",
                Some(&reg.user.token),
                None,
                REQ_TIMEOUT,
            )
            .await
            .and_then(|v| {
                v.get("device_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
        {
            let (mut body, _, _) = make_keys(&reg.user.user_id, &dev, 1);
            let other = SigningKey::generate(&mut OsRng);
            let key_id = format!("ed25519:{dev}");
            body["device_keys"]["signatures"] = json!({});
            sign(&mut body["device_keys"], &other, &reg.user.user_id, &key_id);
            let res = ctx
                .http
                .raw(
                    Method::Post,
                    UPLOAD,
                    Some(&reg.user.token),
                    Some(&json!({ "device_keys": body["device_keys"] })),
                )
                .await;
            let seen = match res {
                Ok((status, v)) => format!(
                    "{status} {}",
                    v.get("errcode").and_then(Value::as_str).unwrap_or("-")
                ),
                Err(e) => format!("transport: {e}"),
            };
            ctx.set(
                "bad_signature_upload",
                json!({ "expected": "400 M_INVALID_SIGNATURE", "got": seen }),
            );
        }
    }

    // Who is who, for the checks below.
    let by_user: BTreeMap<usize, Vec<Arc<Device>>> =
        uploaded.iter().fold(BTreeMap::new(), |mut m, d| {
            m.entry(d.user).or_insert_with(Vec::new).push(d.clone());
            m
        });
    let user_ids: Vec<String> = by_user.values().map(|ds| ds[0].user_id.clone()).collect();
    let known: HashMap<(String, String), Arc<Device>> = uploaded
        .iter()
        .map(|d| ((d.user_id.clone(), d.device_id.clone()), d.clone()))
        .collect();
    // Devices of ours in a /keys/query answer, and how many of them carry a valid self-signature.
    let check_query = |v: &Value| -> (usize, usize) {
        let (mut found, mut valid) = (0, 0);
        if let Some(dk) = v.get("device_keys").and_then(Value::as_object) {
            for (user, devs) in dk {
                for (dev, keys) in devs.as_object().into_iter().flatten() {
                    if let Some(d) = known.get(&(user.clone(), dev.clone())) {
                        found += 1;
                        let same_key = keys
                            .pointer(&format!("/keys/ed25519:{dev}"))
                            .and_then(Value::as_str)
                            == Some(d.ed25519.as_str());
                        if same_key && verify(keys, user, &format!("ed25519:{dev}"), &d.ed25519) {
                            valid += 1;
                        }
                    }
                }
            }
        }
        (found, valid)
    };
    let querier = uploaded[0].clone();

    // 4a. One user asks for every user's devices (sequential runs).
    let all_runs = ctx.args.runs.unwrap_or(5).max(1);
    let body = json!({ "device_keys": user_ids.iter().map(|u| (u.clone(), json!([]))).collect::<serde_json::Map<_, _>>(), "timeout": 10000 });
    let mut lat = Vec::new();
    let mut last = None;
    for _ in 0..all_runs {
        if ctx.past_deadline() {
            break;
        }
        let t = Instant::now();
        let v = ctx
            .http
            .call(
                "keys_query_all",
                Method::Post,
                QUERY,
                Some(&querier.token),
                Some(&body),
                REQ_TIMEOUT,
            )
            .await;
        let dt = ms(t.elapsed());
        if let Some(v) = v {
            lat.push(dt);
            last = Some(v);
        }
    }
    ctx.set("keys_query_all_ms", summary(&lat));
    if let Some(v) = &last {
        let (found, valid) = check_query(v);
        ctx.set("keys_query_all_users", user_ids.len());
        ctx.set("keys_query_all_devices_expected", uploaded.len());
        ctx.set("keys_query_all_devices_returned", found);
        ctx.set("keys_query_all_devices_signature_ok", valid);
        ctx.set("keys_query_all_bytes", v.to_string().len());
        ctx.set(
            "keys_query_all_failures",
            v.get("failures")
                .and_then(Value::as_object)
                .map_or(0, |f| f.len()),
        );
        ctx.progress(format!(
            "query of {} users: p50 {:.1} ms, {found}/{} devices",
            user_ids.len(),
            median(&lat).unwrap_or(0.0),
            uploaded.len()
        ));
    }

    // 4b. Many queries for a few users each (sequential; the querier rotates).
    let n_q = ctx.args.queries;
    let per = ctx.args.query_users.clamp(1, user_ids.len());
    let uploaded_users: Vec<&Vec<Arc<Device>>> = by_user.values().collect();
    let mut lat = Vec::new();
    let (mut missing, mut bad_sig) = (0usize, 0usize);
    for q in 0..n_q {
        if ctx.past_deadline() {
            break;
        }
        let who = &uploaded_users[q % uploaded_users.len()][0];
        let targets: Vec<&Vec<Arc<Device>>> = (0..per)
            .map(|j| uploaded_users[(q * per + j) % uploaded_users.len()])
            .collect();
        let expected: usize = targets.iter().map(|ds| ds.len()).sum();
        let body = json!({
            "device_keys": targets.iter().map(|ds| (ds[0].user_id.clone(), json!([]))).collect::<serde_json::Map<_, _>>(),
            "timeout": 10000,
        });
        let t = Instant::now();
        let v = ctx
            .http
            .call(
                "keys_query",
                Method::Post,
                QUERY,
                Some(&who.token),
                Some(&body),
                REQ_TIMEOUT,
            )
            .await;
        let dt = ms(t.elapsed());
        if let Some(v) = v {
            lat.push(dt);
            let (found, valid) = check_query(&v);
            missing += expected.saturating_sub(found);
            bad_sig += found - valid;
        }
    }
    ctx.set("keys_query_ms", summary(&lat));
    ctx.set("keys_query_users_per_request", per);
    ctx.set("keys_query_missing_devices", missing);
    ctx.set("keys_query_bad_signatures", bad_sig);
    ctx.progress(format!(
        "{} queries of {per} users: p50 {:.1} ms",
        lat.len(),
        median(&lat).unwrap_or(0.0)
    ));

    // 5. Claims: each round claims one signed_curve25519 key for every device of every user,
    // one request per user, made by another user.
    let rounds = ctx.args.claim_rounds;
    ctx.progress(format!(
        "claiming: {rounds} rounds × {} users, {} concurrent",
        uploaded_users.len(),
        ctx.args.claim_concurrency
    ));
    let claimed: Arc<Mutex<HashSet<(String, String, String)>>> = Arc::default();
    let per_device: Arc<Mutex<HashMap<(String, String), u64>>> = Arc::default();
    #[derive(Default)]
    struct ClaimStats {
        keys: usize,
        missing: usize,
        bad_signature: usize,
        unknown_key: usize,
        duplicates: usize,
        failures: usize,
    }
    let stats: Arc<Mutex<ClaimStats>> = Arc::default();
    let mut futs = Vec::new();
    for _round in 0..rounds {
        for (i, devs) in uploaded_users.iter().enumerate() {
            let claimer = uploaded_users[(i + 1) % uploaded_users.len()][0].clone();
            let devs: Vec<Arc<Device>> = devs.to_vec();
            let (ctx, claimed, per_device, stats) = (
                ctx.clone(),
                claimed.clone(),
                per_device.clone(),
                stats.clone(),
            );
            futs.push(async move {
                let user_id = devs[0].user_id.clone();
                let want: serde_json::Map<String, Value> = devs
                    .iter()
                    .map(|d| (d.device_id.clone(), json!("signed_curve25519")))
                    .collect();
                let body = json!({ "one_time_keys": { user_id.clone(): want }, "timeout": 10000 });
                let t = Instant::now();
                let v = ctx
                    .http
                    .call(
                        "keys_claim",
                        Method::Post,
                        CLAIM,
                        Some(&claimer.token),
                        Some(&body),
                        REQ_TIMEOUT,
                    )
                    .await?;
                let dt = ms(t.elapsed());
                let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
                if v.get("failures")
                    .and_then(Value::as_object)
                    .is_some_and(|f| !f.is_empty())
                {
                    st.failures += 1;
                }
                for d in &devs {
                    let got = v.pointer(&format!(
                        "/one_time_keys/{}/{}",
                        user_id.replace('~', "~0").replace('/', "~1"),
                        d.device_id
                    ));
                    let Some((kid, key)) =
                        got.and_then(Value::as_object).and_then(|m| m.iter().next())
                    else {
                        st.missing += 1;
                        continue;
                    };
                    st.keys += 1;
                    if d.otks.get(kid).map(String::as_str) != key.get("key").and_then(Value::as_str)
                    {
                        st.unknown_key += 1;
                    }
                    if !verify(
                        key,
                        &d.user_id,
                        &format!("ed25519:{}", d.device_id),
                        &d.ed25519,
                    ) {
                        st.bad_signature += 1;
                    }
                    let fresh = claimed.lock().unwrap_or_else(|p| p.into_inner()).insert((
                        d.user_id.clone(),
                        d.device_id.clone(),
                        kid.clone(),
                    ));
                    if !fresh {
                        st.duplicates += 1;
                    } else {
                        *per_device
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry((d.user_id.clone(), d.device_id.clone()))
                            .or_default() += 1;
                    }
                }
                Some(dt)
            });
        }
    }
    let t = Instant::now();
    let claims = run_bounded(&ctx, ctx.args.claim_concurrency, futs).await;
    let claim_lat: Vec<f64> = claims.into_iter().flatten().collect();
    {
        let st = stats.lock().unwrap_or_else(|p| p.into_inner());
        ctx.set("keys_claim_ms", summary(&claim_lat));
        ctx.set("keys_claim_wall_ms", round3(ms(t.elapsed())));
        ctx.set("keys_claim_requests", rounds * uploaded_users.len());
        ctx.set("keys_claim_concurrency", ctx.args.claim_concurrency);
        ctx.set(
            "keys_claimed",
            json!({
                "keys": st.keys,
                "missing": st.missing,
                "bad_signature": st.bad_signature,
                "unknown_key": st.unknown_key,
                "duplicates": st.duplicates,
                "responses_with_failures": st.failures,
            }),
        );
    }
    ctx.progress(format!(
        "{} claims: p50 {:.1} ms",
        claim_lat.len(),
        median(&claim_lat).unwrap_or(0.0)
    ));

    // 6. What each device has left must be what it uploaded minus what was claimed from it.
    let futs: Vec<_> = uploaded
        .iter()
        .map(|d| {
            let (ctx, d, per_device) = (ctx.clone(), d.clone(), per_device.clone());
            async move {
                let v = ctx
                    .http
                    .call(
                        "keys_upload_counts",
                        Method::Post,
                        UPLOAD,
                        Some(&d.token),
                        Some(&json!({})),
                        REQ_TIMEOUT,
                    )
                    .await?;
                let have = v
                    .pointer("/one_time_key_counts/signed_curve25519")
                    .and_then(Value::as_u64)?;
                let taken = per_device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(d.user_id.clone(), d.device_id.clone()))
                    .copied()
                    .unwrap_or(0);
                Some(have == (n_otk as u64).saturating_sub(taken))
            }
        })
        .collect();
    let counts = run_bounded(&ctx, ctx.args.setup_concurrency, futs).await;
    ctx.set(
        "otk_counts_after_claims",
        json!({
            "checked": counts.iter().flatten().count(),
            "mismatched": counts.iter().flatten().filter(|ok| !**ok).count(),
        }),
    );
    ctx.set("rss_end_kb", ctx.rss_kb());
}
