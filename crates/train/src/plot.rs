//! Loss curves as a PNG (`OUT/loss.png`), with no image crate: one panel per logged term, top to bottom in the
//! order they first appear in `metrics.jsonl` (loss, ce, kd_logits, kd_attention), each scaled to its own range,
//! raw values in light colour and a 20-step moving average in dark. The PNG is written with stored (uncompressed)
//! deflate blocks, which every reader accepts.

use anyhow::{Context, Result};
use std::path::Path;

const W: usize = 800;
const PANEL_H: usize = 160;
const MARGIN: usize = 10;

/// Term names (in first-appearance order, skipping lr/step/tokens_per_s) and their per-step values.
pub fn read_metrics(jsonl: &Path) -> Result<Vec<(String, Vec<f64>)>> {
    let text = std::fs::read_to_string(jsonl).with_context(|| format!("{}: cannot read", jsonl.display()))?;
    let mut series: Vec<(String, Vec<f64>)> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // A tiny parser for our own flat records: "key":number pairs.
        for part in line.trim_matches(|c| c == '{' || c == '}').split(',') {
            let Some((k, v)) = part.split_once(':') else { continue };
            let k = k.trim().trim_matches('"');
            if matches!(k, "step" | "lr" | "tokens_per_s") {
                continue;
            }
            let Ok(v) = v.trim().parse::<f64>() else { continue };
            match series.iter_mut().find(|(n, _)| n == k) {
                Some((_, vals)) => vals.push(v),
                None => series.push((k.to_string(), vec![v])),
            }
        }
    }
    Ok(series)
}

pub fn plot_metrics(jsonl: &Path, png: &Path) -> Result<()> {
    let series = read_metrics(jsonl)?;
    let h = MARGIN + series.len().max(1) * (PANEL_H + MARGIN);
    let mut img = vec![[255u8, 255, 255]; W * h];
    let colours = [
        ([160, 160, 230], [20, 20, 160]),
        ([230, 160, 160], [170, 20, 20]),
        ([150, 210, 150], [20, 120, 20]),
        ([220, 190, 120], [150, 100, 0]),
    ];
    for (i, (_, vals)) in series.iter().enumerate() {
        let top = MARGIN + i * (PANEL_H + MARGIN);
        for x in MARGIN..W - MARGIN {
            img[(top + PANEL_H) * W + x] = [0, 0, 0];
        }
        for y in top..=top + PANEL_H {
            img[y * W + MARGIN] = [0, 0, 0];
        }
        let finite: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            continue;
        }
        let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let span = (hi - lo).max(1e-12);
        let n = vals.len();
        let smooth: Vec<f64> = (0..n)
            .map(|j| {
                let s = &vals[j.saturating_sub(19)..=j];
                s.iter().sum::<f64>() / s.len() as f64
            })
            .collect();
        let (light, dark) = colours[i % colours.len()];
        for (line, colour) in [(vals, light), (&smooth, dark)] {
            let mut prev: Option<(usize, usize)> = None;
            for (j, v) in line.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let x = MARGIN + 1 + j * (W - 2 * MARGIN - 2) / n.max(2).saturating_sub(1).max(1);
                let y = top + PANEL_H - 1 - (((v - lo) / span) * (PANEL_H - 2) as f64) as usize;
                if let Some((px, py)) = prev {
                    let steps = px.abs_diff(x).max(py.abs_diff(y)).max(1);
                    for s in 0..=steps {
                        let xx = (px as f64 + (x as f64 - px as f64) * s as f64 / steps as f64) as usize;
                        let yy = (py as f64 + (y as f64 - py as f64) * s as f64 / steps as f64) as usize;
                        img[yy.min(h - 1) * W + xx.min(W - 1)] = colour;
                    }
                }
                prev = Some((x, y));
            }
        }
    }
    std::fs::write(png, encode_png(&img, W, h)).with_context(|| format!("{}: cannot write", png.display()))
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    out.extend_from_slice(&c);
    out.extend_from_slice(&crc32(&c).to_be_bytes());
}

/// RGB8 PNG with a zlib stream of stored deflate blocks.
pub fn encode_png(px: &[[u8; 3]], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for row in px.chunks_exact(w) {
        raw.push(0); // filter: none
        row.iter().for_each(|p| raw.extend_from_slice(p));
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&(b << 16 | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    /// The PNG container: signature, chunk lengths and CRCs, and the stored deflate stream holding the filtered rows.
    #[test]
    fn png_is_well_formed() {
        let px = vec![[1u8, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]];
        let png = super::encode_png(&px, 2, 2);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut i = 8;
        let mut kinds = Vec::new();
        while i < png.len() {
            let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let body = &png[i + 4..i + 8 + len];
            let crc = u32::from_be_bytes(png[i + 8 + len..i + 12 + len].try_into().unwrap());
            assert_eq!(super::crc32(body), crc);
            kinds.push(String::from_utf8_lossy(&body[..4]).into_owned());
            if &body[..4] == b"IDAT" {
                let z = &body[4..];
                assert_eq!(&z[..3], &[0x78, 0x01, 1]);
                assert_eq!(&z[7..7 + 14], &[0, 1, 2, 3, 4, 5, 6, 0, 7, 8, 9, 10, 11, 12]);
            }
            i += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_eq!(super::crc32(b"IEND"), 0xAE42_6082);
    }
}
