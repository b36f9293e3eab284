//! QR codes of `.conf` files and pairing codes, for the WireGuard apps' "scan"
//! button: SVG (admin page), PNG (files) and text for a terminal.

use qrcode::{render::unicode::Dense1x2, EcLevel, QrCode};

fn code(text: &str) -> anyhow::Result<QrCode> {
    // Medium error correction: a .conf with a preshared key still fits easily.
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(|e| anyhow::anyhow!("the text does not fit in a QR code: {e}"))
}

/// An SVG image.
pub fn svg(text: &str) -> anyhow::Result<String> {
    Ok(code(text)?
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(256, 256)
        .build())
}

/// A PNG image.
pub fn png(text: &str) -> anyhow::Result<Vec<u8>> {
    let img = code(text)?
        .render::<image::Luma<u8>>()
        .min_dimensions(384, 384)
        .build();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Text for a terminal (two modules per character cell), dark on light.
pub fn terminal(text: &str) -> anyhow::Result<String> {
    Ok(code(text)?
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_conf() {
        let text = "[Interface]\nPrivateKey = ".to_owned() + &"A".repeat(44) + "\n";
        let s = svg(&text).unwrap();
        assert!(s.starts_with("<?xml") && s.contains("<svg"));
        let p = png(&text).unwrap();
        assert_eq!(&p[1..4], b"PNG");
        let img = image::load_from_memory(&p).unwrap();
        assert!(img.width() >= 384);
        let t = terminal(&text).unwrap();
        assert!(t.lines().count() > 10);
        assert!(code(&"x".repeat(5000)).is_err());
    }
}
