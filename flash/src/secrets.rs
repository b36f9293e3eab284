//! Checks of the pre-seed that need more than the box itself carries (password
//! strength, the time-zone database), and generated secrets.

use rand::{distributions::Alphanumeric, rngs::OsRng, Rng};
use secta_preseed::Preseed;

/// Every problem of the pre-seed: the box's own checks, plus strength of the
/// Wi-Fi passphrase (zxcvbn score ≥ 3: WPA handshakes can be attacked offline)
/// and of a chosen admin password, that the time zone exists, and the VPN exit
/// `.conf` as the WireGuard gateway reads it.
pub fn problems(p: &Preseed, admin_password_generated: bool) -> Vec<String> {
    let mut out = p.problems();
    let context: Vec<&str> = [
        p.box_name.as_str(),
        p.server_name.as_str(),
        p.wifi.ssid.as_str(),
        p.admin.username.as_str(),
        "secta",
    ]
    .into();
    if let Some(pw) = &p.wifi.passphrase {
        if secta_preseed::passphrase_problem(pw).is_none() {
            if let Some(why) = weak(pw, &context) {
                out.push(format!("Wi-Fi password is too easy to guess: {why}"));
            }
        }
    }
    if !admin_password_generated {
        if let Some(why) = weak(&p.admin.password, &context) {
            out.push(format!("admin password is too easy to guess: {why}"));
        }
    }
    if let Some(why) = p
        .vpn_exit_conf
        .as_deref()
        .and_then(secta_wireguard::store::exit_conf_problem)
    {
        out.push(format!("VPN exit .conf: {why}"));
    }
    if let Some(tz) = &p.timezone {
        if secta_preseed::timezone_syntax_problem(tz).is_none()
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            out.push(format!(
                "time zone {tz:?} is unknown (IANA names such as Europe/Moscow, Asia/Almaty, UTC)"
            ));
        }
    }
    out
}

/// Why `pw` is weak, or None when zxcvbn scores it at least 3 of 4.
fn weak(pw: &str, context: &[&str]) -> Option<String> {
    let e = zxcvbn::zxcvbn(pw, context);
    if (e.score() as u8) >= 3 {
        return None;
    }
    let mut why = vec![format!("strength {} of 4, 3 needed", e.score() as u8)];
    if let Some(f) = e.feedback() {
        if let Some(w) = f.warning() {
            why.push(w.to_string());
        }
        why.extend(f.suggestions().iter().map(|s| s.to_string()));
    }
    Some(why.join("; "))
}

/// A random secret of `len` letters and digits from the OS's generator.
pub fn random_token(len: usize) -> String {
    OsRng
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secta_preseed::{Admin, Wifi};

    fn preseed(pass: &str, admin: &str, tz: &str) -> Preseed {
        Preseed {
            version: 1,
            box_name: "Kommuna".into(),
            server_name: "kommuna.example".into(),
            country: "DE".into(),
            timezone: Some(tz.into()),
            wifi: Wifi {
                ssid: "Kommuna".into(),
                passphrase: Some(pass.into()),
            },
            admin: Admin {
                username: "admin".into(),
                password: admin.into(),
            },
            invite: None,
            vpn_exit_conf: None,
            peers: vec![],
        }
    }

    #[test]
    fn weak_passwords_and_unknown_zones_are_refused() {
        let good = preseed(
            "tulip-quarry-anvil-73",
            "bright-ocean-ledger-9",
            "Europe/Berlin",
        );
        assert_eq!(problems(&good, false), Vec::<String>::new());
        for (wifi, admin, tz, generated, expected) in [
            (
                "password1",
                "bright-ocean-ledger-9",
                "UTC",
                false,
                "Wi-Fi password is too easy",
            ),
            (
                "Kommuna123",
                "bright-ocean-ledger-9",
                "UTC",
                false,
                "Wi-Fi password is too easy",
            ),
            (
                "tulip-quarry-anvil-73",
                "qwertyuiop",
                "UTC",
                false,
                "admin password is too easy",
            ),
            (
                "tulip-quarry-anvil-73",
                "qwertyuiop",
                "Mars/Olympus",
                true,
                "time zone \"Mars/Olympus\" is unknown",
            ),
        ] {
            let p = problems(&preseed(wifi, admin, tz), generated);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with(expected), "{p:?}");
        }
    }

    #[test]
    fn tokens_are_random() {
        let a = random_token(20);
        assert_eq!(a.len(), 20);
        assert_ne!(a, random_token(20));
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
