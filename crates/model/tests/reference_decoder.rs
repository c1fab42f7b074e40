//! The decoder against an independent, deliberately naive f64 implementation, on tiny random-weight models of
//! every architecture configuration (written with ternlm's own GGUF writer, F32 weights so no quantization is
//! involved): llama (interleaved RoPE), qwen2 (QKV biases, NeoX), qwen3 (QK-norm), bitnet-b1.58 (sub-norms,
//! relu², head tied even though an `output` tensor exists), bitnet (sub-norms, SiLU, NeoX). GQA throughout.
//! Each case also checks that a wrong variant (e.g. the other RoPE layout) is far outside the tolerance, so the
//! comparison can tell the configurations apart.

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Model};

const D: usize = 64;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const HD: usize = 16;
const FF: usize = 96;
const N_LAYER: usize = 2;
const VOCAB: usize = 40;
const EPS: f64 = 1e-5;
const BASE: f64 = 10000.0;

#[derive(Clone, Copy, PartialEq)]
struct Variant {
    neox: bool,
    biases: bool,
    qk_norm: bool,
    sub_norms: bool,
    relu2: bool,
    tied: bool,
    /// Per-tensor `.scale` tensors on the projections (1bitLLM `bitnet` files).
    scales: bool,
}

type Weights = HashMap<String, (Vec<u64>, Vec<f32>)>;

fn make_weights(arch: &str, v: Variant, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w: Weights = HashMap::new();
    let mut add = |name: String, dims: Vec<u64>, scale: f32, offset: f32| {
        let n: u64 = dims.iter().product();
        let data = (0..n).map(|_| offset + rng.gen_range(-scale..scale)).collect();
        w.insert(name, (dims, data));
    };
    add("token_embd.weight".into(), vec![D as u64, VOCAB as u64], 1.0, 0.0);
    add("output_norm.weight".into(), vec![D as u64], 0.2, 1.0);
    if !v.tied || arch.starts_with("bitnet-b1.58") {
        // bitnet-b1.58 must ignore this tensor and use the embedding.
        add("output.weight".into(), vec![D as u64, VOCAB as u64], 0.3, 0.0);
    }
    let (qd, kvd) = ((N_HEAD * HD) as u64, (N_KV * HD) as u64);
    let s = 0.25;
    for l in 0..N_LAYER {
        let p = |x: &str| format!("blk.{l}.{x}");
        add(p("attn_norm.weight"), vec![D as u64], 0.2, 1.0);
        add(p("ffn_norm.weight"), vec![D as u64], 0.2, 1.0);
        add(p("attn_q.weight"), vec![D as u64, qd], s, 0.0);
        add(p("attn_k.weight"), vec![D as u64, kvd], s, 0.0);
        add(p("attn_v.weight"), vec![D as u64, kvd], s, 0.0);
        add(p("attn_output.weight"), vec![qd, D as u64], s, 0.0);
        add(p("ffn_gate.weight"), vec![D as u64, FF as u64], s, 0.0);
        add(p("ffn_up.weight"), vec![D as u64, FF as u64], s, 0.0);
        add(p("ffn_down.weight"), vec![FF as u64, D as u64], s, 0.0);
        if v.biases {
            add(p("attn_q.bias"), vec![qd], 0.5, 0.0);
            add(p("attn_k.bias"), vec![kvd], 0.5, 0.0);
            add(p("attn_v.bias"), vec![kvd], 0.5, 0.0);
        }
        if v.qk_norm {
            add(p("attn_q_norm.weight"), vec![HD as u64], 0.3, 1.0);
            add(p("attn_k_norm.weight"), vec![HD as u64], 0.3, 1.0);
        }
        if v.scales {
            for proj in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
                add(p(&format!("{proj}.scale")), vec![1], 0.5, 1.0);
            }
        }
        if v.sub_norms {
            add(p("attn_sub_norm.weight"), vec![qd], 0.3, 1.0);
            add(p("ffn_sub_norm.weight"), vec![FF as u64], 0.3, 1.0);
        }
    }
    w
}

fn write_gguf(arch: &str, w: &Weights) -> Vec<u8> {
    let mut g = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    g.set("general.architecture", Value::String(arch.into()))
        .set(k("vocab_size"), Value::U32(VOCAB as u32))
        .set(k("embedding_length"), Value::U32(D as u32))
        .set(k("block_count"), Value::U32(N_LAYER as u32))
        .set(k("feed_forward_length"), Value::U32(FF as u32))
        .set(k("attention.head_count"), Value::U32(N_HEAD as u32))
        .set(k("attention.head_count_kv"), Value::U32(N_KV as u32))
        .set(k("rope.freq_base"), Value::F32(BASE as f32))
        .set(k("attention.layer_norm_rms_epsilon"), Value::F32(EPS as f32))
        .set(k("context_length"), Value::U32(64));
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    for n in names {
        let (dims, data) = &w[n];
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        g.add_tensor(n.clone(), GgmlType::F32, dims, bytes).unwrap();
    }
    g.to_bytes()
}

// ---- the naive reference ----

fn t<'a>(w: &'a Weights, n: &str) -> &'a [f32] {
    &w[n].1
}

fn matvec(w: &[f32], x: &[f64], rows: usize) -> Vec<f64> {
    let k = x.len();
    (0..rows).map(|r| (0..k).map(|c| w[r * k + c] as f64 * x[c]).sum()).collect()
}

fn rmsnorm(x: &[f64], g: &[f32]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + EPS).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * *g as f64).collect()
}

fn rope(x: &mut [f64], pos: usize, neox: bool) {
    let half = HD / 2;
    for i in 0..half {
        let theta = pos as f64 * BASE.powf(-2.0 * i as f64 / HD as f64);
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * theta.cos() - x1 * theta.sin();
        x[b] = x0 * theta.sin() + x1 * theta.cos();
    }
}

/// W·x, times the tensor's `.scale` when the variant has one.
fn proj(w: &Weights, v: Variant, name: &str, x: &[f64], rows: usize) -> Vec<f64> {
    let mut y = matvec(t(w, &format!("{name}.weight")), x, rows);
    if v.scales {
        let s = t(w, &format!("{name}.scale"))[0] as f64;
        y.iter_mut().for_each(|y| *y *= s);
    }
    y
}

fn reference(w: &Weights, v: Variant, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (qd, kvd) = (N_HEAD * HD, N_KV * HD);
    let mut kc: Vec<Vec<Vec<f64>>> = vec![vec![]; N_LAYER];
    let mut vc: Vec<Vec<Vec<f64>>> = vec![vec![]; N_LAYER];
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let e = t(w, "token_embd.weight");
        let mut x: Vec<f64> = e[tok as usize * D..(tok as usize + 1) * D].iter().map(|&v| v as f64).collect();
        for l in 0..N_LAYER {
            let p = |s: &str| format!("blk.{l}.{s}");
            let h = rmsnorm(&x, t(w, &p("attn_norm.weight")));
            let mut q = proj(w, v, &p("attn_q"), &h, qd);
            let mut k = proj(w, v, &p("attn_k"), &h, kvd);
            let mut vv = proj(w, v, &p("attn_v"), &h, kvd);
            if v.biases {
                for (a, b) in [(&mut q, "attn_q.bias"), (&mut k, "attn_k.bias"), (&mut vv, "attn_v.bias")] {
                    a.iter_mut().zip(t(w, &p(b))).for_each(|(a, b)| *a += *b as f64);
                }
            }
            for head in q.chunks_mut(HD) {
                if v.qk_norm {
                    let n = rmsnorm(head, t(w, &p("attn_q_norm.weight")));
                    head.copy_from_slice(&n);
                }
                rope(head, pos, v.neox);
            }
            for head in k.chunks_mut(HD) {
                if v.qk_norm {
                    let n = rmsnorm(head, t(w, &p("attn_k_norm.weight")));
                    head.copy_from_slice(&n);
                }
                rope(head, pos, v.neox);
            }
            kc[l].push(k);
            vc[l].push(vv);
            let mut o = vec![0f64; qd];
            for hh in 0..N_HEAD {
                let kvh = hh / (N_HEAD / N_KV);
                let qh = &q[hh * HD..(hh + 1) * HD];
                let sc: Vec<f64> = (0..=pos)
                    .map(|j| (0..HD).map(|i| qh[i] * kc[l][j][kvh * HD + i]).sum::<f64>() / (HD as f64).sqrt())
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = ex.iter().sum();
                for j in 0..=pos {
                    for i in 0..HD {
                        o[hh * HD + i] += ex[j] / z * vc[l][j][kvh * HD + i];
                    }
                }
            }
            if v.sub_norms {
                o = rmsnorm(&o, t(w, &p("attn_sub_norm.weight")));
            }
            let a = proj(w, v, &p("attn_output"), &o, D);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            let h = rmsnorm(&x, t(w, &p("ffn_norm.weight")));
            let g = proj(w, v, &p("ffn_gate"), &h, FF);
            let u = proj(w, v, &p("ffn_up"), &h, FF);
            let mut act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| if v.relu2 { g.max(0.0).powi(2) * u } else { g / (1.0 + (-g).exp()) * u })
                .collect();
            if v.sub_norms {
                act = rmsnorm(&act, t(w, &p("ffn_sub_norm.weight")));
            }
            let dn = proj(w, v, &p("ffn_down"), &act, D);
            x.iter_mut().zip(&dn).for_each(|(x, d)| *x += d);
        }
        let xn = rmsnorm(&x, t(w, "output_norm.weight"));
        let head = if v.tied { t(w, "token_embd.weight") } else { t(w, "output.weight") };
        out.push(matvec(head, &xn, VOCAB));
    }
    out
}

fn max_diff(a: &[f32], b: &[Vec<f64>]) -> f64 {
    a.chunks_exact(VOCAB)
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(x, y)| (*x as f64 - y).abs()))
        .fold(0.0, f64::max)
}

fn check(arch: &str, v: Variant, wrong: Variant) {
    let w = make_weights(arch, v, 42);
    let bytes = write_gguf(arch, &w);
    let f = Arc::new(GgufFile::from_bytes(format!("{arch}.gguf"), bytes).unwrap());
    let model = Model::from_gguf(f).unwrap();
    let pool = ThreadPool::new(2);
    let tokens: Vec<u32> = vec![3, 17, 5, 39, 0, 22, 8, 8, 11, 30];
    // Prompt in two batches (the second continues the cache), every position's logits.
    let mut kv = model.new_kv_cache(32, 1);
    let mk = |r: std::ops::Range<usize>| -> Vec<BatchToken> {
        r.map(|i| BatchToken { token: tokens[i], pos: i, seq: 0, logits: true }).collect()
    };
    let mut got = model.forward(&mk(0..6), &mut kv, &pool).unwrap();
    got.extend(model.forward(&mk(6..tokens.len()), &mut kv, &pool).unwrap());
    let want = reference(&w, v, &tokens);
    let err = max_diff(&got, &want);
    let scale = want.iter().flatten().map(|x| x.abs()).fold(0.0, f64::max);
    // The engine keeps K/V and the attention accumulator in f16 (as llama.cpp does): ~1e-3 relative error.
    let tol = 5e-3 * scale.max(1.0);
    assert!(err < tol, "{arch}: max |logit diff| {err:.5} exceeds {tol:.5} (logit scale {scale:.2})");
    let off = max_diff(&got, &reference(&w, wrong, &tokens));
    assert!(off > 10.0 * tol, "{arch}: a wrong variant is only {off:.5} away; the test cannot tell them apart");
    eprintln!("{arch}: max diff {err:.2e} (tolerance {tol:.2e}, wrong variant {off:.2e})");
}

const BASE_V: Variant =
    Variant { neox: false, biases: false, qk_norm: false, sub_norms: false, relu2: false, tied: false, scales: false };

#[test]
fn llama_interleaved_rope() {
    check("llama", BASE_V, Variant { neox: true, ..BASE_V });
}

#[test]
fn qwen2_biases_neox() {
    let v = Variant { neox: true, biases: true, ..BASE_V };
    check("qwen2", v, Variant { biases: false, ..v });
}

#[test]
fn qwen3_qk_norm() {
    let v = Variant { neox: true, qk_norm: true, ..BASE_V };
    check("qwen3", v, Variant { qk_norm: false, ..v });
}

#[test]
fn bitnet_b158_sub_norms_relu2_tied_head() {
    let v = Variant { neox: true, sub_norms: true, relu2: true, tied: true, ..BASE_V };
    check("bitnet-b1.58", v, Variant { tied: false, ..v });
}

#[test]
fn bitnet_sub_norms_silu() {
    let v = Variant { neox: true, sub_norms: true, ..BASE_V };
    check("bitnet", v, Variant { relu2: true, ..v });
}

#[test]
fn bitnet_per_tensor_scales() {
    let v = Variant { neox: true, sub_norms: true, scales: true, ..BASE_V };
    check("bitnet", v, Variant { scales: false, ..v });
}
