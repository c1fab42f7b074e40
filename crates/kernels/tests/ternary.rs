//! Ternary formats against the bitnet.cpp fixtures and adversarial inputs.

use std::path::PathBuf;
use ternlm_gguf::GgufFile;
use ternlm_kernels::dot::Backend;
use ternlm_kernels::matmul::WeightBytes;
use ternlm_kernels::quant::quantize_i2s;
use ternlm_kernels::scalar::{dequantize_row, i2s_tensor_scale};
use ternlm_kernels::{ActType, GgmlType, QMatrix, QuantizedActs, ThreadPool};

fn fixtures() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
        .join("fixtures/models")
}

fn dequant_tensor(f: &GgufFile, name: &str) -> (GgmlType, Vec<f32>) {
    let t = f.tensor_info(name).unwrap();
    let data = f.tensor_data(t);
    let n = t.n_elements() as usize;
    let mut out = vec![0f32; n];
    let (body, scale) = if t.ty == GgmlType::I2_S { (&data[..n / 4], i2s_tensor_scale(data)) } else { (data, 1.0) };
    dequantize_row(t.ty, body, &mut out, scale).unwrap();
    (t.ty, out)
}

/// F3 (TQ2_0) and F1 (I2_S) hold the same ternary weights: they decode to identical values, and re-quantizing
/// F1's values with bitnet.cpp's rule gives back F1's bytes (the tail after the scale is uninitialised memory in
/// bitnet.cpp's output and is not compared).
#[test]
fn tq2_0_fixture_decodes_to_the_i2s_fixture_values() {
    let f1 = GgufFile::open(fixtures().join("tiny-b158-i2s.gguf")).unwrap();
    let f3 = GgufFile::open(fixtures().join("tiny-b158-tq2_0.gguf")).unwrap();
    let mut n = 0;
    for t in f1.tensors().iter().filter(|t| t.ty == GgmlType::I2_S) {
        let (ty3, v3) = dequant_tensor(&f3, &t.name);
        assert_eq!(ty3, GgmlType::TQ2_0, "{}", t.name);
        let (_, v1) = dequant_tensor(&f1, &t.name);
        assert_eq!(v1, v3, "{}: TQ2_0 and I2_S values differ", t.name);
        let requant = quantize_i2s(&v1);
        let orig = f1.tensor_data(t);
        let body = orig.len() - 32;
        assert_eq!(&requant[..body + 4], &orig[..body + 4], "{}: re-quantized I2_S bytes differ", t.name);
        n += 1;
    }
    assert_eq!(n, 14);
}

/// A 64-bit LCG's high bits: reproducible test data without a crate.
fn lcg(mut seed: u64) -> impl FnMut() -> u32 {
    move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    }
}

/// xorshift64: reproducible test data without a crate.
fn xorshift64(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

fn i2s_matrix(codes: &[u8], rows: usize, k: usize, scale: f32, backend: Backend) -> QMatrix {
    let w: Vec<f32> = codes.iter().map(|&c| (c as f32 - 1.0) * scale).collect();
    let mut bytes = quantize_i2s(&w);
    if codes.iter().all(|&c| c == 1) {
        // An all-zero tensor has max 0; keep the scale so the epilogue is exercised.
        let body = bytes.len() - 32;
        bytes[body..body + 4].copy_from_slice(&scale.to_le_bytes());
    }
    assert_eq!(bytes.len(), rows * k / 4 + 32);
    QMatrix::with_backend(GgmlType::I2_S, WeightBytes::owned(bytes), rows, k, backend).unwrap()
}

#[test]
fn code3_detection() {
    assert!(!ternlm_kernels::scalar::i2s_has_code3(&[0b1001_0100, 0b0110_0010]));
    assert!(ternlm_kernels::scalar::i2s_has_code3(&[0b0000_1100]));
}

/// Exact integer result for comparison: (Σ c·q − Σ q) / s · w_scale with i64 sums.
fn exact(codes: &[u8], q: &[u8], k: usize, w_scale: f32) -> f32 {
    let sq: i64 = (0..k).map(|i| q[i] as i8 as i64).sum();
    let scq: i64 = (0..k).map(|i| codes[i] as i64 * q[i] as i8 as i64).sum();
    let s = f32::from_le_bytes(q[k..k + 4].try_into().unwrap());
    (scq - sq) as i32 as f32 / s * w_scale
}

#[test]
fn i2s_adversarial_and_random_shapes_are_exact() {
    let pool = ThreadPool::new(2);
    let backends: Vec<Backend> = if Backend::detect() != Backend::Scalar {
        vec![Backend::Scalar, Backend::detect()]
    } else {
        vec![Backend::Scalar]
    };
    let mut rnd = lcg(99);
    // (rows, k, pattern): 0 = random codes, 1 = all +1 with acts all +max (sums far beyond int16), 2 = all -1 with
    // alternating ±max acts, 3 = all-zero rows. Row counts of 4 and more go through the four-row decode kernel
    // (with 1–3 rows left for the single-row one).
    for (rows, k, pattern) in [(3, 128, 0), (5, 640, 0), (4, 6912, 1), (6, 8192, 2), (9, 2560, 3), (7, 1024, 0)] {
        let codes: Vec<u8> = (0..rows * k)
            .map(|_| match pattern {
                1 => 2,
                2 => 0,
                3 => 1,
                _ => (rnd() % 3) as u8,
            })
            .collect();
        let x: Vec<f32> = (0..k)
            .map(|i| match pattern {
                1 => 3.0,
                2 => {
                    if i % 2 == 0 {
                        3.0
                    } else {
                        -3.0
                    }
                }
                _ => (rnd() % 2001) as f32 / 1000.0 - 1.0,
            })
            .collect();
        // Five activation rows (the batched four-token kernel plus one single): the first is the pattern above.
        let mut x5 = x.clone();
        for t in 1..5 {
            x5.extend(x.iter().enumerate().map(|(i, v)| if (i + t) % 3 == 0 { -v } else { *v * (t as f32) }));
        }
        let q5 = QuantizedActs::quantize(ActType::I8PerToken, &x5, k);
        let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
        if pattern == 1 {
            assert!(q.row(0)[..k].iter().all(|&b| b as i8 == 127), "activations at the int8 extreme");
        }
        for &backend in &backends {
            let m = i2s_matrix(&codes, rows, k, 0.75, backend);
            let mut out = vec![0f32; rows];
            m.matmul(&q, &mut out, &pool);
            for r in 0..rows {
                let want = exact(&codes[r * k..(r + 1) * k], q.row(0), k, 0.75);
                assert_eq!(out[r].to_bits(), want.to_bits(), "{backend:?} rows={rows} k={k} pattern={pattern} row {r}");
            }
            let mut out5 = vec![0f32; rows * 5];
            m.matmul(&q5, &mut out5, &pool);
            for t in 0..5 {
                for r in 0..rows {
                    let want = exact(&codes[r * k..(r + 1) * k], q5.row(t), k, 0.75);
                    assert_eq!(out5[t * rows + r].to_bits(), want.to_bits(), "{backend:?} batched token {t} row {r}");
                }
            }
        }
    }
}

/// Per-token TQ kernels: AVX2 equals the scalar reference bit for bit, and both equal exact integer math.
#[test]
fn tq_per_token_kernels() {
    use ternlm_kernels::dot::Kernels;
    use ternlm_kernels::quant::{quantize_tq1_0, quantize_tq2_0};
    let k = 1024;
    let mut seed = 5u32;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let w: Vec<f32> = (0..k).map(|i| ((rnd() % 3) as f32 - 1.0) * if i < 512 { 0.5 } else { 0.25 }).collect();
    let x: Vec<f32> = (0..k).map(|_| (rnd() % 2001) as f32 / 500.0 - 2.0).collect();
    let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
    let a = q.row(0);
    for (ty, bytes) in [(GgmlType::TQ2_0, quantize_tq2_0(&w)), (GgmlType::TQ1_0, quantize_tq1_0(&w))] {
        let reference = (Kernels::tq_per_token(ty, Backend::Scalar).unwrap().dot)(&bytes, a, k, 1.0);
        // Exact: blocks 0–1 have d = 0.5, blocks 2–3 d = 0.25.
        let isum = |r: std::ops::Range<usize>| -> i64 {
            r.map(|i| (w[i] / if i < 512 { 0.5 } else { 0.25 }) as i64 * a[i] as i8 as i64).sum()
        };
        let s = f32::from_le_bytes(a[k..k + 4].try_into().unwrap());
        let want = (0.5 * (isum(0..256) as f32)
            + 0.5 * (isum(256..512) as f32)
            + 0.25 * (isum(512..768) as f32)
            + 0.25 * (isum(768..1024) as f32))
            / s;
        assert_eq!(reference.to_bits(), want.to_bits(), "{ty}");
        if Backend::detect() == Backend::Avx2 {
            let simd = (Kernels::tq_per_token(ty, Backend::Avx2).unwrap().dot)(&bytes, a, k, 1.0);
            assert_eq!(simd.to_bits(), reference.to_bits(), "{ty} AVX2 vs scalar");
        }
    }
}

/// Per-token TQ matmuls over batches (for TQ1_0 the AVX2 four-token kernel for each group of four, then the
/// single-token one): every output equals the scalar reference's bits.
#[test]
fn tq_per_token_batched_matmul_equals_scalar() {
    use ternlm_kernels::quant::{quantize_tq1_0, quantize_tq2_0};
    if Backend::detect() == Backend::Scalar {
        eprintln!("LOUD SKIP: no AVX2 on this CPU; per-token TQ batches not compared");
        return;
    }
    let (rows, k) = (12usize, 768usize);
    let mut rnd = xorshift64(0x9E3779B97F4A7C15);
    let w: Vec<f32> = (0..rows * k).map(|i| ((rnd() % 3) as f32 - 1.0) * (1.0 + (i / 256 % 5) as f32 / 4.0)).collect();
    let pool = ThreadPool::new(2);
    for (ty, bytes) in [(GgmlType::TQ2_0, quantize_tq2_0(&w)), (GgmlType::TQ1_0, quantize_tq1_0(&w))] {
        for n_tok in [4usize, 9] {
            let x: Vec<f32> = (0..n_tok * k).map(|_| (rnd() % 4001) as f32 / 1000.0 - 2.0).collect();
            let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
            let mut outs = Vec::new();
            for backend in [Backend::Scalar, Backend::Avx2] {
                let mut m = QMatrix::with_backend(ty, WeightBytes::owned(bytes.clone()), rows, k, backend).unwrap();
                m.use_per_token_acts();
                assert_eq!(m.act_type(), ActType::I8PerToken);
                let mut out = vec![0f32; n_tok * rows];
                m.matmul(&q, &mut out, &pool);
                outs.push(out);
            }
            for (i, (a, b)) in outs[1].iter().zip(&outs[0]).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{ty} n_tok={n_tok} out {i}: AVX2 {a} vs scalar {b}");
            }
        }
    }
}

/// I2_S matrices whose rows are not whole 128-weight blocks (SmolLM2's 576, here 192 and 320): bitnet.cpp's
/// blocks run over the flattened tensor, so the kernels repack rows at load. Every backend must equal the exact
/// integer formula on the original codes, and dequantized rows must be the original weights.
#[test]
fn i2s_rows_that_are_not_whole_blocks() {
    let pool = ThreadPool::new(2);
    for (rows, k) in [(6usize, 192usize), (2, 320), (16, 576)] {
        assert_eq!(rows * k % 128, 0);
        let mut rnd = xorshift64(0x2545F4914F6CDD1D ^ (k as u64));
        let codes: Vec<u8> = (0..rows * k).map(|_| (rnd() % 3) as u8).collect();
        let scale = 0.0371f32;
        let values: Vec<f32> = codes.iter().map(|&c| (c as f32 - 1.0) * scale).collect();
        let bytes = quantize_i2s(&values);
        assert_eq!(bytes.len() as u64, GgmlType::I2_S.tensor_bytes(k as u64, (rows * k) as u64).unwrap());
        assert_eq!(ternlm_kernels::scalar::dequantize_tensor(GgmlType::I2_S, &bytes, rows, k).unwrap(), values);
        let x: Vec<f32> = (0..5 * k).map(|_| (rnd() % 2001) as f32 / 1000.0 - 1.0).collect();
        let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
        let mut results = Vec::new();
        for backend in [Backend::Scalar, Backend::detect()] {
            let m = QMatrix::with_backend(GgmlType::I2_S, WeightBytes::owned(bytes.clone()), rows, k, backend).unwrap();
            let mut row = vec![0f32; k];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                assert_eq!(row, values[r * k..(r + 1) * k], "{rows}x{k} row {r}");
            }
            let mut out = vec![0f32; 5 * rows];
            m.matmul(&q, &mut out, &pool);
            for t in 0..5 {
                for r in 0..rows {
                    let want = exact(&codes[r * k..(r + 1) * k], q.row(t), k, scale);
                    assert_eq!(out[t * rows + r], want, "{backend:?} {rows}x{k} token {t} row {r}");
                }
            }
            results.push(out);
        }
        assert_eq!(results[0], results[1]);
    }
}

/// A grouped matmul (Q/K/V, gate/up as one pool job, with tasks that straddle matrices) equals separate matmuls
/// bit for bit, for decode and for batches (each batch token equal to that token alone), on every backend, including
/// matrices with padded rows.
#[test]
fn grouped_matmul_equals_separate_matmuls() {
    let pool = ThreadPool::new(2);
    let mut rnd = lcg(7);
    for backend in [Backend::Scalar, Backend::detect()] {
        // Row counts that are not multiples of the task size, so tasks cover the end of one matrix and the start
        // of the next; k = 320 gives padded (ragged) rows.
        for (k, row_counts) in [(256, vec![37usize, 5, 70]), (640, vec![3, 129]), (320, vec![8, 16, 24])] {
            let mats: Vec<QMatrix> = row_counts
                .iter()
                .enumerate()
                .map(|(i, &rows)| {
                    let codes: Vec<u8> = (0..rows * k).map(|_| (rnd() % 3) as u8).collect();
                    i2s_matrix(&codes, rows, k, 0.5 + i as f32, backend)
                })
                .collect();
            // 70 tokens take the long-batch task size (64 rows per task).
            for n_tok in [1usize, 6, 70] {
                let x: Vec<f32> = (0..n_tok * k).map(|_| (rnd() % 2001) as f32 / 1000.0 - 1.0).collect();
                let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
                let want: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|m| {
                        let mut o = vec![0f32; n_tok * m.rows];
                        m.matmul(&q, &mut o, &pool);
                        o
                    })
                    .collect();
                // Each token of a batch equals that token alone (the single-token path's tasks and kernels).
                for t in (0..n_tok).step_by(23) {
                    let qt = QuantizedActs::quantize(ActType::I8PerToken, &x[t * k..(t + 1) * k], k);
                    for (m, w) in mats.iter().zip(&want) {
                        let mut o = vec![0f32; m.rows];
                        m.matmul(&qt, &mut o, &pool);
                        let same =
                            o.iter().zip(&w[t * m.rows..(t + 1) * m.rows]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{backend:?} k={k} n_tok={n_tok} token {t}: batch differs from the token alone");
                    }
                }
                let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; n_tok * m.rows]).collect();
                let mut parts: Vec<(&QMatrix, &mut [f32])> =
                    mats.iter().zip(outs.iter_mut()).map(|(m, o)| (m, o.as_mut_slice())).collect();
                QMatrix::matmul_group(&mut parts, &q, &pool);
                for (i, (got, want)) in outs.iter().zip(&want).enumerate() {
                    let same = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{backend:?} k={k} n_tok={n_tok} matrix {i}: grouped result differs");
                }
            }
        }
    }
}
