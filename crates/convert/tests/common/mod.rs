//! Synthetic Hugging Face checkpoints written with the `safetensors` crate, and an independent f64 forward pass in
//! Hugging Face's conventions (rotate-half RoPE on un-permuted q/k, HF tensor names, BitNet's absmean weights and
//! per-token int8 activations for ternary layers) to compare converted models against.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED").map(PathBuf::from).unwrap_or_else(|| root().join("../shared"))
}

pub fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One stored tensor: dtype, shape and raw little-endian bytes.
#[derive(Clone)]
pub struct Stored {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn store(dtype: Dtype, shape: &[usize], v: &[f32]) -> Stored {
    let bytes = match dtype {
        Dtype::F32 => f32_bytes(v),
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        _ => panic!("store: {dtype:?}"),
    };
    Stored { dtype, shape: shape.to_vec(), bytes }
}

/// The values a stored float tensor decodes to (after its dtype's rounding).
pub fn values(s: &Stored) -> Vec<f32> {
    match s.dtype {
        Dtype::F32 => s.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F16 => s.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => s.bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => panic!("values: {:?}", s.dtype),
    }
}

pub type Tensors = BTreeMap<String, Stored>;

/// Writes `tensors` as safetensors shards (`shards` > 1 writes an index) plus config.json.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &Tensors, shards: usize) {
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                weight_map.insert((*n).clone(), json!(file));
                ((*n).clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// A small byte-level BPE tokenizer.json: the 256 byte symbols, a few merges, and two special tokens.
pub fn write_tiny_bpe_tokenizer(dir: &Path, n_vocab: usize) {
    let table = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    for (i, m) in merges.iter().enumerate() {
        vocab.insert(m.replace(' ', ""), json!(256 + i));
    }
    let n_base = 256 + merges.len();
    let added = json!([
        {"id": n_base, "content": "<|begin_of_text|>", "special": true},
        {"id": n_base + 1, "content": "<|eot_id|>", "special": true},
    ]);
    assert!(n_base + 2 <= n_vocab);
    let tj = json!({
        "version": "1.0", "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": null, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": false, "ignore_merges": true},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tj).unwrap()).unwrap();
    let cfg = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": true,
                     "chat_template": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}"});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// GPT-2's byte → printable-char table.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A tiny SentencePiece tokenizer.model: <unk>, <s>, </s>, the 256 byte pieces, and a few words.
pub fn write_tiny_spm_tokenizer(dir: &Path) -> usize {
    use ternlm_convert::vocab::SpModel;
    let mut pieces: Vec<(String, f32, i32)> =
        vec![("<unk>".into(), 0.0, 2), ("<s>".into(), 0.0, 3), ("</s>".into(), 0.0, 3)];
    for b in 0..256 {
        pieces.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (i, w) in ["▁", "▁the", "▁a", "e", "t", "h", "▁t", "he"].iter().enumerate() {
        pieces.push((w.to_string(), -(i as f32), 1));
    }
    let n = pieces.len();
    let sp = SpModel { pieces, unk: 0, bos: 1, eos: 2, pad: -1, add_dummy_prefix: true };
    std::fs::write(dir.join("tokenizer.model"), sp.to_bytes()).unwrap();
    let cfg = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true, "add_eos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    n
}

pub struct Rand(rand::rngs::StdRng);
impl Rand {
    pub fn new(seed: u64) -> Self {
        Rand(rand::rngs::StdRng::seed_from_u64(seed))
    }
    pub fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + self.0.gen_range(-scale..scale)).collect()
    }
    pub fn codes(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.0.gen_range(-1i8..=1)).collect()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reference forward pass (f64) in Hugging Face conventions.
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
pub struct RefCfg {
    pub d: usize,
    pub n_head: usize,
    pub n_kv: usize,
    pub hd: usize,
    pub ff: usize,
    pub n_layer: usize,
    pub vocab: usize,
    pub eps: f64,
    pub base: f64,
    pub relu2: bool,
    /// Ternary projections get per-token int8 activations (BitNet / I2_S semantics).
    pub int8_acts: bool,
    /// llama.cpp's CPU flash attention (ternlm's numerics for llama/qwen): online softmax with the weighted sum
    /// of V kept in f16. BitNet archs use bitnet.cpp's f32 probabilities instead.
    pub flash_f16: bool,
    /// HF's "llama3" rope_scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    pub rope_llama3: Option<(f64, f64, f64, f64)>,
}

/// A linear layer for the reference: weights (rows × cols, f64) and whether its input is quantized to int8.
pub struct RefLinear {
    pub w: Vec<f64>,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<Vec<f64>>,
    /// Ternary: codes and scale (y = (codes·q)/s_act · scale with q the int8 activations).
    pub ternary: Option<(Vec<i8>, f64)>,
}

impl RefLinear {
    /// `int8_acts`: BitNet semantics (a ternary GGUF); without it the ternary weights meet float activations (the
    /// same checkpoint converted to a float type).
    pub fn apply(&self, x: &[f64], int8_acts: bool) -> Vec<f64> {
        let mut y: Vec<f64> = match &self.ternary {
            Some((codes, scale)) if !int8_acts => (0..self.rows)
                .map(|r| (0..self.cols).map(|c| codes[r * self.cols + c] as f64 * x[c]).sum::<f64>() * scale)
                .collect(),
            Some((codes, scale)) => {
                let amax = x.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-5);
                let s = (127.0 / amax) as f32 as f64;
                let q: Vec<f64> =
                    x.iter().map(|v| ((v * s) as f32).round_ties_even().clamp(-128.0, 127.0) as f64).collect();
                (0..self.rows)
                    .map(|r| {
                        let dot: f64 = (0..self.cols).map(|c| codes[r * self.cols + c] as f64 * q[c]).sum();
                        dot / s * scale
                    })
                    .collect()
            }
            None => (0..self.rows).map(|r| (0..self.cols).map(|c| self.w[r * self.cols + c] * x[c]).sum()).collect(),
        };
        if let Some(b) = &self.bias {
            y.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        y
    }
}

pub struct RefLayer {
    pub attn_norm: Vec<f64>,
    pub q: RefLinear,
    pub k: RefLinear,
    pub v: RefLinear,
    pub o: RefLinear,
    pub q_norm: Option<Vec<f64>>,
    pub k_norm: Option<Vec<f64>>,
    pub attn_sub_norm: Option<Vec<f64>>,
    pub ffn_norm: Vec<f64>,
    pub gate: RefLinear,
    pub up: RefLinear,
    pub down: RefLinear,
    pub ffn_sub_norm: Option<Vec<f64>>,
}

pub struct RefModel {
    pub cfg: RefCfg,
    pub embed: Vec<f64>,
    pub head: Vec<f64>,
    pub norm: Vec<f64>,
    pub layers: Vec<RefLayer>,
}

fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * r * g).collect()
}

/// HF's rotate_half RoPE on one head, with its llama3 frequency smoothing when configured.
fn rope(x: &mut [f64], pos: usize, base: f64, llama3: Option<(f64, f64, f64, f64)>) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let mut freq = base.powf(-((2 * i) as f64) / hd as f64);
        if let Some((factor, low, high, orig)) = llama3 {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen > orig / low {
                freq /= factor;
            } else if wavelen >= orig / high {
                let smooth = (orig / wavelen - low) / (high - low);
                freq = (1.0 - smooth) * freq / factor + smooth * freq;
            }
        }
        let theta = pos as f64 * freq;
        let (c, s) = (theta.cos(), theta.sin());
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

impl RefModel {
    /// Logits at every position of `tokens`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let c = self.cfg;
        let mut ks: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layer];
        let mut vs: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layer];
        let mut out = Vec::new();
        for (pos, &t) in tokens.iter().enumerate() {
            let mut x: Vec<f64> = self.embed[t as usize * c.d..(t as usize + 1) * c.d].to_vec();
            for (l, ly) in self.layers.iter().enumerate() {
                let h = rmsnorm(&x, &ly.attn_norm, c.eps);
                let mut q = ly.q.apply(&h, c.int8_acts);
                let mut k = ly.k.apply(&h, c.int8_acts);
                let v = ly.v.apply(&h, c.int8_acts);
                for (buf, norm, n) in [(&mut q, &ly.q_norm, c.n_head), (&mut k, &ly.k_norm, c.n_kv)] {
                    for hh in 0..n {
                        let head = &mut buf[hh * c.hd..(hh + 1) * c.hd];
                        if let Some(g) = norm {
                            let y = rmsnorm(head, g, c.eps);
                            head.copy_from_slice(&y);
                        }
                        rope(head, pos, c.base, c.rope_llama3);
                    }
                }
                // ternlm (like llama.cpp and bitnet.cpp) keeps K and V in an f16 cache and rounds Q to f16. With
                // int8-requantizing BitNet layers that rounding matters: it moves some activations across int8
                // rounding boundaries, so the reference does it too.
                let f16r = |v: &mut Vec<f64>| v.iter_mut().for_each(|x| *x = half::f16::from_f64(*x).to_f64());
                let (mut k, mut v) = (k, v);
                f16r(&mut q);
                f16r(&mut k);
                f16r(&mut v);
                ks[l].push(k);
                vs[l].push(v);
                let mut att = vec![0f64; c.n_head * c.hd];
                for hh in 0..c.n_head {
                    let kvh = hh / (c.n_head / c.n_kv);
                    let qh = &q[hh * c.hd..(hh + 1) * c.hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let kh = &ks[l][j][kvh * c.hd..(kvh + 1) * c.hd];
                            qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (c.hd as f64).sqrt()
                        })
                        .collect();
                    if c.flash_f16 {
                        let r16 = |x: f64| half::f16::from_f64(x).to_f64();
                        let (mut acc, mut m, mut z) = (vec![0f64; c.hd], f64::NEG_INFINITY, 0f64);
                        for (j, &sc) in scores.iter().enumerate() {
                            let (mut ms, mut w) = (1.0, 1.0);
                            if sc > m {
                                ms = (m - sc).exp();
                                m = sc;
                                acc.iter_mut().for_each(|a| *a = r16(*a * ms));
                            } else {
                                w = (sc - m).exp();
                            }
                            let vh = &vs[l][j][kvh * c.hd..(kvh + 1) * c.hd];
                            acc.iter_mut().zip(vh).for_each(|(a, v)| *a = r16(*a + v * w));
                            z = z * ms + w;
                        }
                        for i in 0..c.hd {
                            att[hh * c.hd + i] = acc[i] / z;
                        }
                        continue;
                    }
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, p) in e.iter().enumerate() {
                        let vh = &vs[l][j][kvh * c.hd..(kvh + 1) * c.hd];
                        for i in 0..c.hd {
                            att[hh * c.hd + i] += p / z * vh[i];
                        }
                    }
                }
                if let Some(g) = &ly.attn_sub_norm {
                    att = rmsnorm(&att, g, c.eps);
                }
                let o = ly.o.apply(&att, c.int8_acts);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let h = rmsnorm(&x, &ly.ffn_norm, c.eps);
                let g = ly.gate.apply(&h, c.int8_acts);
                let u = ly.up.apply(&h, c.int8_acts);
                let mut m: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| if c.relu2 { g.max(0.0).powi(2) * u } else { g / (1.0 + (-g).exp()) * u })
                    .collect();
                if let Some(gn) = &ly.ffn_sub_norm {
                    m = rmsnorm(&m, gn, c.eps);
                }
                let dn = ly.down.apply(&m, c.int8_acts);
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            }
            let xn = rmsnorm(&x, &self.norm, c.eps);
            out.push((0..c.vocab).map(|v| (0..c.d).map(|i| self.head[v * c.d + i] * xn[i]).sum()).collect());
        }
        out
    }
}

/// BitNet's absmean ternarization, written independently of the converter: mean |W| (f64 sum, f32 result,
/// floored at 1e-5), codes = clamp(round_half_even(W / mean)), scale = mean. Done in f32 as the spec says.
pub fn absmean_reference(w: &[f32]) -> (Vec<i8>, f32) {
    let mut sum = 0f64;
    for v in w {
        sum += v.abs() as f64;
    }
    let mean = ((sum / w.len() as f64) as f32).max(1e-5);
    let inv = 1.0f32 / mean;
    let codes = w.iter().map(|v| (v * inv).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
    (codes, 1.0f32 / inv)
}
