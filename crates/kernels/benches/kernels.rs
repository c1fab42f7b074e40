//! `cargo bench -p ternlm-kernels`: the matmul kernels on a 2B4T-shaped projection (ffn_up, 6912×2560), for every
//! weight type the engine streams (TQ types with both activation formats), on the scalar reference and on the SIMD
//! backend, one token (decode) and a batch (prompt). Std only (no criterion: it would double the dev build on 2
//! cores); each case prints the median and spread of its repetitions, and decode cases the weight bytes streamed
//! per second.
//!
//! Decode cycles through enough copies of the matrix to exceed the last-level cache, so it measures what a real
//! model's token sees (weights from DRAM). `cargo bench -p ternlm-kernels -- i2_s` runs the cases whose name contains
//! `i2_s`; `TERNLM_BENCH_REPS` sets the repetitions (default 15), `TERNLM_BENCH_THREADS` the pool size (default 2),
//! `TERNLM_BENCH_STREAM_MB` the bytes decode cycles through (default 256; `1` keeps one copy in cache, which gives
//! the kernel's compute ceiling).

use std::sync::Arc;
use std::time::Instant;
use ternlm_kernels::matmul::WeightBytes;
use ternlm_kernels::quant::{quantize_i2s, quantize_q6_k, quantize_q8_0, quantize_tq1_0, quantize_tq2_0};
use ternlm_kernels::{Backend, GgmlType, QMatrix, QuantizedActs, ThreadPool};

const ROWS: usize = 6912;
const COLS: usize = 2560;
/// Decode streams at least this many weight bytes per pass over its copies.
const STREAM_BYTES: usize = 256 << 20;

/// Deterministic weights in [-1, 1) with ~1/3 near zero, so the ternary quantizers see all three codes.
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn encode(ty: GgmlType, w: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::I2_S => quantize_i2s(w),
        GgmlType::TQ2_0 => quantize_tq2_0(w),
        GgmlType::TQ1_0 => quantize_tq1_0(w),
        GgmlType::Q8_0 => quantize_q8_0(w),
        GgmlType::Q6_K => quantize_q6_k(w),
        GgmlType::F16 => w.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        _ => unreachable!("no encoder for {ty}"),
    }
}

struct Stats {
    median_s: f64,
    min_s: f64,
    max_s: f64,
}

fn measure(reps: usize, mut f: impl FnMut()) -> Stats {
    f(); // warm-up: page faults, pool start, caches
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    Stats { median_s: t[t.len() / 2], min_s: t[0], max_s: t[t.len() - 1] }
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let reps: usize = std::env::var("TERNLM_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let threads: usize = std::env::var("TERNLM_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads);
    let w = weights(ROWS * COLS);
    let mut backends = vec![Backend::Scalar];
    if Backend::detect() != Backend::Scalar {
        backends.push(Backend::detect());
    }
    println!("matmul {ROWS}x{COLS}, {threads} thread(s), median of {reps} (min..max)");
    println!("{:<28} {:>12} {:>22} {:>10}", "case", "median", "spread", "rate");
    for ty in [GgmlType::I2_S, GgmlType::TQ2_0, GgmlType::TQ1_0, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::F16] {
        let bytes = Arc::new(encode(ty, &w));
        let stream = std::env::var("TERNLM_BENCH_STREAM_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(STREAM_BYTES, |m| m << 20);
        let copies = stream.div_ceil(bytes.len()).max(1);
        // TQ files run with llama.cpp's per-block Q8_K activations by default and with BitNet's per-token int8
        // under `--tq-acts per-token`; both are timed (the latter named `…-pt`).
        let act_modes: &[bool] =
            if matches!(ty, GgmlType::TQ1_0 | GgmlType::TQ2_0) { &[false, true] } else { &[false] };
        for (&backend, &per_token) in backends.iter().flat_map(|b| act_modes.iter().map(move |p| (b, p))) {
            let mats: Vec<QMatrix> = (0..copies)
                .map(|_| {
                    // Copies of the bytes, so each matrix lives at its own addresses and decode streams from DRAM.
                    let own = WeightBytes::owned(bytes.as_slice().to_vec());
                    let mut m = QMatrix::with_backend(ty, own, ROWS, COLS, backend).expect("valid matrix");
                    if per_token {
                        m.use_per_token_acts();
                    }
                    if ty == GgmlType::F16 {
                        m.use_f32_activations();
                    }
                    m
                })
                .collect();
            for n_tok in [1usize, 128] {
                let name = format!(
                    "{}{}/{:?}/{}",
                    ty.to_string().to_lowercase(),
                    if per_token { "-pt" } else { "" },
                    backend,
                    if n_tok == 1 { "decode".into() } else { format!("pp{n_tok}") }
                );
                if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                    continue;
                }
                // The scalar reference is slow; fewer repetitions keep the suite short and still give a median.
                let reps = if backend == Backend::Scalar { reps.min(5) } else { reps };
                let x = QuantizedActs::quantize(mats[0].act_type(), &weights(n_tok * COLS), COLS);
                let mut out = vec![0f32; n_tok * ROWS];
                let mut i = 0;
                let s = if n_tok == 1 {
                    measure(reps, || {
                        // One pass over all copies per repetition; the time is per matrix.
                        for m in &mats {
                            m.matmul(&x, &mut out, &pool);
                        }
                    })
                } else {
                    measure(reps, || {
                        mats[i % mats.len()].matmul(&x, &mut out, &pool);
                        i += 1;
                    })
                };
                std::hint::black_box(&out);
                let per = if n_tok == 1 { copies as f64 } else { 1.0 };
                let (med, lo, hi) = (s.median_s / per, s.min_s / per, s.max_s / per);
                let rate = if n_tok == 1 {
                    format!("{:.1} GB/s", bytes.len() as f64 / med / 1e9)
                } else {
                    format!("{:.0} tok/s", n_tok as f64 / med)
                };
                println!("{name:<28} {:>9.1} µs {:>9.1}..{:<9.1} µs {rate:>10}", med * 1e6, lo * 1e6, hi * 1e6);
            }
        }
    }
}
