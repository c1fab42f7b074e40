//! Ternary weights in every form a converter meets: absmean ternarization of latent full-precision weights
//! (BitNet's `weight_quant`), the packed-uint8 + `weight_scale` checkpoints of HF's `BitLinear` /
//! `AutoBitLinear`, and the ggml encodings (I2_S exactly as bitnet.cpp's quantizer writes it, TQ2_0, TQ1_0).

use anyhow::{bail, Result};

/// A ternary matrix: codes in {-1, 0, 1}, one scale for the tensor; weight = code × scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Ternary {
    pub codes: Vec<i8>,
    pub scale: f32,
}

impl Ternary {
    /// BitNet b1.58's absmean ternarization, as in bitnet.cpp's converter and HF's `WeightQuant`, in f32:
    /// `s = 1 / max(mean|W|, 1e-5)`, `code = clamp(round_half_even(W·s), -1, 1)`, scale = `1/s`.
    /// The mean is summed in f64 (PyTorch's f32 mean is a pairwise sum; both round to the same f32 except in
    /// rare last-bit cases, which move the scale by one ulp, never a code).
    pub fn absmean(w: &[f32]) -> Ternary {
        let sum = w.iter().fold(0f64, |a, v| a + v.abs() as f64);
        Self::absmean_with_mean(w, ((sum / w.len().max(1) as f64) as f32).max(1e-5))
    }

    /// [`Ternary::absmean`] with the tensor's mean |W| already known (the converter ternarizes large tensors a
    /// slice of rows at a time): `mean` must be `max(mean|W|, 1e-5)` of the whole tensor.
    pub fn absmean_with_mean(w: &[f32], mean: f32) -> Ternary {
        let s = 1.0f32 / mean;
        let codes = w.iter().map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
        Ternary { codes, scale: 1.0f32 / s }
    }

    /// Values code × scale (what a dequantizer of this tensor returns).
    pub fn values(&self) -> Vec<f32> {
        self.codes.iter().map(|&c| c as f32 * self.scale).collect()
    }

    /// Unpacks HF's packed layout: uint8 tensor of shape [rows/4, cols]; row `r + i·rows/4` of the unpacked
    /// matrix is bits `2i..2i+2` of packed row `r`, stored as code + 1.
    pub fn unpack_hf(packed: &[u8], rows: usize, cols: usize, scale: f32) -> Result<Ternary> {
        if !rows.is_multiple_of(4) || packed.len() != rows / 4 * cols {
            bail!(
                "packed ternary weight of {} bytes cannot hold {rows}×{cols} codes (needs rows/4 × cols bytes)",
                packed.len()
            );
        }
        let q = rows / 4;
        let mut codes = vec![0i8; rows * cols];
        for i in 0..4 {
            for r in 0..q {
                let src = &packed[r * cols..(r + 1) * cols];
                let dst = &mut codes[(i * q + r) * cols..(i * q + r + 1) * cols];
                for (d, &b) in dst.iter_mut().zip(src) {
                    let c = (b >> (2 * i)) & 3;
                    if c == 3 {
                        bail!(
                            "packed ternary weight holds the unused code 3 (row {}, not a BitNet packing)",
                            i * q + r
                        );
                    }
                    *d = c as i8 - 1;
                }
            }
        }
        Ok(Ternary { codes, scale })
    }

    /// The inverse of [`Ternary::unpack_hf`] (rows must be a multiple of 4).
    pub fn pack_hf(&self, rows: usize, cols: usize) -> Vec<u8> {
        let q = rows / 4;
        let mut out = vec![0u8; q * cols];
        for i in 0..4 {
            for r in 0..q {
                for c in 0..cols {
                    out[r * cols + c] |= ((self.codes[(i * q + r) * cols + c] + 1) as u8) << (2 * i);
                }
            }
        }
        out
    }
}

/// How a packed checkpoint's `weight_scale` relates to the weights. HF's two BitNet layers disagree:
/// `BitLinear` (Falcon3-1.58bit, Falcon-E, `linear_class: bitlinear`) computes `y / weight_scale`, so it stores
/// 1/mean|W|; `AutoBitLinear` (BitNet 2B4T, `linear_class: autobitlinear`) computes `y · weight_scale`, so it
/// stores mean|W|.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleConvention {
    Multiply,
    Divide,
}

impl ScaleConvention {
    /// The weight scale (value of a +1 code) from a stored `weight_scale`.
    pub fn weight_scale(self, stored: f32) -> f32 {
        match self {
            ScaleConvention::Multiply => stored,
            ScaleConvention::Divide => 1.0 / stored,
        }
    }
}

/// Picks the convention from `quantization_config.linear_class` and checks it against the numbers: a ternary
/// projection of an LLM has |w| = mean|W| far below 1, so a stored value above 1 under `Multiply` (or below 1
/// under `Divide`) means the checkpoint uses the other convention. Returns the convention and, when the
/// numbers contradict the config, a warning saying so (the numbers win).
pub fn detect_convention(linear_class: Option<&str>, stored_scales: &[f32]) -> (ScaleConvention, Option<String>) {
    let by_config = match linear_class {
        Some("autobitlinear") => Some(ScaleConvention::Multiply),
        Some(_) => Some(ScaleConvention::Divide),
        None => None,
    };
    let above = stored_scales.iter().filter(|&&s| s > 1.0).count();
    let by_numbers = if stored_scales.is_empty() {
        None
    } else if above * 2 > stored_scales.len() {
        Some(ScaleConvention::Divide)
    } else {
        Some(ScaleConvention::Multiply)
    };
    match (by_config, by_numbers) {
        (Some(c), Some(n)) if c != n => (
            n,
            Some(format!(
                "quantization_config.linear_class {:?} implies weight_scale is {:?}d, but {above} of {} stored scales are above 1, which only fits {n:?}; using {n:?}",
                linear_class.unwrap_or(""),
                c,
                stored_scales.len()
            )),
        ),
        (Some(c), _) => (c, None),
        (None, Some(n)) => (n, None),
        (None, None) => (ScaleConvention::Multiply, None),
    }
}

/// Encodes ternary weights of a matrix with rows of `cols` as a ggml type; I2_S goes through bitnet.cpp's
/// quantizer (so the bytes equal its output for the same values).
pub fn encode_ternary(t: &Ternary, ty: ternlm_gguf::GgmlType) -> Result<Vec<u8>> {
    use ternlm_gguf::GgmlType as G;
    use ternlm_kernels::quant;
    let v = t.values();
    Ok(match ty {
        G::I2_S => quant::quantize_i2s(&v),
        G::TQ2_0 => quant::quantize_tq2_0(&v),
        G::TQ1_0 => quant::quantize_tq1_0(&v),
        other => bail!("{other} is not a ternary type"),
    })
}

/// Decodes a ternary ggml tensor (I2_S, TQ1_0, TQ2_0) back to codes and one scale. TQ types carry a scale per
/// 256-block; `None` if those differ (then the tensor is not one-scale ternary and must be exported dequantized).
pub fn decode_ternary(ty: ternlm_gguf::GgmlType, data: &[u8], n: usize) -> Option<Ternary> {
    use ternlm_gguf::GgmlType as G;
    use ternlm_kernels::scalar;
    match ty {
        G::I2_S => {
            let scale = scalar::i2s_tensor_scale(data);
            let mut codes = Vec::with_capacity(n);
            let mut c = [0i8; 128];
            for blk in data[..n / 4].chunks_exact(32) {
                scalar::i2s_codes(blk, &mut c);
                // `i2s_codes` gives c = w + 1 (the unused code 3 already read as weight 0).
                codes.extend(c.iter().map(|&x| x - 1));
            }
            Some(Ternary { codes, scale })
        }
        G::TQ1_0 | G::TQ2_0 => {
            let bb = ty.block_bytes();
            let mut codes = Vec::with_capacity(n);
            let mut scale: Option<f32> = None;
            for blk in data.chunks_exact(bb) {
                let d = half::f16::from_le_bytes([blk[bb - 2], blk[bb - 1]]).to_f32();
                let trits = if ty == G::TQ1_0 { scalar::tq1_0_trits(blk) } else { scalar::tq2_0_trits(blk) };
                let nz = trits.iter().any(|&t| t != 1);
                if nz && d != 0.0 {
                    match scale {
                        None => scale = Some(d),
                        Some(s) if s != d => return None,
                        _ => {}
                    }
                }
                codes.extend(trits.iter().map(|&t| if d == 0.0 { 0 } else { t as i8 - 1 }));
            }
            Some(Ternary { codes, scale: scale.unwrap_or(0.0) })
        }
        _ => None,
    }
}
