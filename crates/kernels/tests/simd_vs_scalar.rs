//! Every SIMD kernel equals the scalar reference: bit-exactly for integer formats (per-block integer sums and
//! whole-row dots), to rounding for float formats. Inputs are random blocks (every bit pattern, with finite
//! scales) and adversarial ones (extreme codes with activations at ±127).

use rand::{Rng, SeedableRng};
use ternlm_kernels::act::{quantize_row, ActType};
use ternlm_kernels::dot::{simd_block_isum, Backend, Kernels};
use ternlm_kernels::{scalar, GgmlType, QMatrix, QuantizedActs, ThreadPool};

const INT_TYPES: [GgmlType; 11] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::I2_S,
];

/// Byte offsets of the f16 scale fields in a block, which must hold finite values.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q6_K => &[208],
        TQ1_0 => &[52],
        TQ2_0 => &[64],
        _ => &[],
    }
}

fn random_weights(ty: GgmlType, k: usize, rows: usize, rng: &mut impl Rng, extreme: bool) -> Vec<u8> {
    if let GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 = ty {
        let vals = (0..rows * k).map(|_| rng.gen_range(-1.0f32..1.0));
        return match ty {
            GgmlType::F32 => vals.flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
            _ => vals.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        };
    }
    let bb = ty.block_bytes();
    let n_blocks = rows * k / ty.block_size();
    let mut w = vec![0u8; n_blocks * bb];
    for b in w.chunks_exact_mut(bb) {
        for x in b.iter_mut() {
            *x = if extreme { [0x00, 0xFF, 0xAA, 0x55][rng.gen_range(0..4)] } else { rng.gen() };
        }
        for &o in f16_fields(ty) {
            let v = half::f16::from_f32(rng.gen_range(-0.1..0.1));
            b[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    if ty == GgmlType::I2_S {
        let mut tail = [0u8; 32];
        tail[..4].copy_from_slice(&rng.gen_range(0.01f32..2.0).to_le_bytes());
        w.extend_from_slice(&tail);
    }
    w
}

fn random_acts(k: usize, n: usize, rng: &mut impl Rng, extreme: bool) -> Vec<f32> {
    (0..k * n)
        .map(|_| if extreme { [-1.0f32, 1.0][rng.gen_range(0..2)] * 3.0 } else { rng.gen_range(-4.0..4.0) })
        .collect()
}

#[test]
fn simd_block_sums_equal_scalar_exactly() {
    let Some(_) = simd_block_isum(GgmlType::Q8_0) else {
        eprintln!("LOUD SKIP: this CPU has no AVX2; the SIMD kernels cannot be compared here");
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for ty in INT_TYPES {
        let simd = simd_block_isum(ty).expect("every integer type has an AVX2 block kernel");
        let act = ActType::for_weight(ty).unwrap();
        let wbs = ty.block_size();
        for trial in 0..400 {
            let extreme = trial % 4 == 0;
            let w = random_weights(ty, wbs, 1, &mut rng, extreme);
            let x = random_acts(wbs.max(act.block()), 1, &mut rng, extreme);
            let mut a = vec![0u8; act.row_bytes(x.len())];
            quantize_row(act, &x, &mut a);
            let want: (i32, i32) = match ty {
                GgmlType::Q4_0 => (scalar::isum_q4_0(&w, &a), 0),
                GgmlType::Q4_1 => (scalar::isum_q4_1(&w, &a), 0),
                GgmlType::Q5_0 => (scalar::isum_q5_0(&w, &a), 0),
                GgmlType::Q5_1 => (scalar::isum_q5_1(&w, &a), 0),
                GgmlType::Q8_0 => (scalar::isum_q8_0(&w, &a), 0),
                GgmlType::Q4_K => scalar::isum_q4_k(&w, &a),
                GgmlType::Q5_K => scalar::isum_q5_k(&w, &a),
                GgmlType::Q6_K => (scalar::isum_q6_k(&w, &a), 0),
                GgmlType::TQ1_0 => (scalar::isum_tq1_0(&w, &a), 0),
                GgmlType::TQ2_0 => (scalar::isum_tq2_0(&w, &a), 0),
                GgmlType::I2_S => (scalar::isum_i2s(&w, &a), 0),
                _ => unreachable!(),
            };
            assert_eq!(simd(&w, &a), want, "{ty} trial {trial} (extreme={extreme})");
        }
    }
}

/// Row dots through the public kernels, and the threaded matmul, on several shapes and batch sizes.
#[test]
fn simd_matmul_equals_scalar() {
    if Backend::detect() == Backend::Scalar {
        eprintln!("LOUD SKIP: no SIMD backend on this CPU; SIMD matmul not compared");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let pool = ThreadPool::new(2);
    let all = [GgmlType::F32, GgmlType::F16, GgmlType::BF16].into_iter().chain(INT_TYPES);
    for ty in all {
        let act = ActType::for_weight(ty).unwrap();
        let unit = ty.block_size().max(act.block()).max(32);
        // 19 blocks: kernels that take several blocks per step (Q8_0 eight at a time) also run their tails.
        for (k_blocks, rows, n_tok) in [(1, 3, 1), (2, 17, 3), (3, 40, 5), (19, 5, 2)] {
            let k = unit * k_blocks;
            let extreme = rows == 17;
            let w = random_weights(ty, k, rows, &mut rng, extreme);
            let x = random_acts(k, n_tok, &mut rng, extreme);
            let wb = ternlm_kernels::matmul::WeightBytes::owned(w);
            let simd = QMatrix::with_backend(ty, wb.clone(), rows, k, Backend::detect()).unwrap();
            let refm = QMatrix::with_backend(ty, wb, rows, k, Backend::Scalar).unwrap();
            let q = QuantizedActs::quantize(act, &x, k);
            let (mut o1, mut o2) = (vec![0f32; rows * n_tok], vec![0f32; rows * n_tok]);
            simd.matmul(&q, &mut o1, &pool);
            refm.matmul(&q, &mut o2, &pool);
            for (i, (a, b)) in o1.iter().zip(&o2).enumerate() {
                if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{ty} k={k} out {i}: {a} vs {b}");
                } else {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty} k={k} rows={rows} out {i}: {a} vs {b}");
                }
            }
            // And the row dot equals dequantize-then-dot in f32 up to rounding (checks the formats themselves).
            let kern = Kernels::new(ty, Backend::Scalar).unwrap();
            let mut deq = vec![0f32; k];
            refm.dequantize_row(0, &mut deq);
            let xq = q.row(0);
            let mut xd = vec![0f32; k];
            dequantize_act(act, xq, &mut xd);
            let want: f32 = deq.iter().zip(&xd).map(|(a, b)| a * b).sum();
            let got = (kern.dot)(refm.row(0), xq, k, refm.scale);
            let mag: f32 = deq.iter().zip(&xd).map(|(a, b)| (a * b).abs()).sum();
            assert!((got - want).abs() <= 2e-3 * (1.0 + mag), "{ty} k={k}: dot {got} vs dequantized {want}");
        }
    }
}

/// Dequantizes an activation row (test helper; the engine never needs it).
fn dequantize_act(ty: ActType, a: &[u8], out: &mut [f32]) {
    use ternlm_kernels::{f16_at, f32_at};
    match ty {
        ActType::F32 => out.iter_mut().enumerate().for_each(|(i, o)| *o = f32_at(a, 4 * i)),
        ActType::F16 => out.iter_mut().enumerate().for_each(|(i, o)| *o = f16_at(a, 2 * i)),
        ActType::BF16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32::from_bits((u16::from_le_bytes([a[2 * i], a[2 * i + 1]]) as u32) << 16)),
        ActType::Q8_0 | ActType::Q8_1 => {
            let (bb, q0) = if ty == ActType::Q8_0 { (34, 2) } else { (36, 4) };
            for (b, o) in a.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                o.iter_mut().enumerate().for_each(|(j, o)| *o = d * (b[q0 + j] as i8) as f32);
            }
        }
        ActType::Q8_K => {
            for (b, o) in a.chunks_exact(292).zip(out.chunks_exact_mut(256)) {
                let d = f32_at(b, 0);
                o.iter_mut().enumerate().for_each(|(j, o)| *o = d * (b[4 + j] as i8) as f32);
            }
        }
        ActType::I8PerToken => {
            let k = out.len();
            let s = f32_at(a, k);
            out.iter_mut().enumerate().for_each(|(j, o)| *o = (a[j] as i8) as f32 / s);
        }
    }
}

/// Activation quantizers keep their side sums consistent with their quants.
#[test]
fn activation_side_sums_are_consistent() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let x = random_acts(512, 1, &mut rng, false);
    let q = QuantizedActs::quantize(ActType::Q8_K, &x, 512);
    for b in q.data.chunks_exact(292) {
        let total: i32 = (0..256).map(|j| b[4 + j] as i8 as i32).sum();
        assert_eq!(total, scalar::q8k_bsum_all(b));
        assert!((0..256).all(|j| b[4 + j] as i8 != -128));
    }
    let q = QuantizedActs::quantize(ActType::I8PerToken, &x, 512);
    let r = q.row(0);
    let sum: i32 = (0..512).map(|j| r[j] as i8 as i32).sum();
    assert_eq!(sum, i32::from_le_bytes([r[516], r[517], r[518], r[519]]));
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(ternlm_kernels::f32_at(r, 512), 127.0 / amax);
}

/// F16 weights dotted with f32 activations (the BitNet output head): the AVX2 kernel (four accumulators, a tail of
/// 8-wide steps, then scalar) equals the scalar reference to rounding on every tail length.
#[test]
fn f16_with_f32_activations_equals_scalar() {
    if Backend::detect() == Backend::Scalar {
        eprintln!("LOUD SKIP: no AVX2 on this CPU; F16 x f32 kernel not compared");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let pool = ThreadPool::new(2);
    for (k, rows) in [(1, 3), (7, 2), (8, 5), (31, 3), (32, 4), (40, 9), (100, 3), (2560, 33)] {
        let w: Vec<u8> =
            (0..rows * k).flat_map(|_| half::f16::from_f32(rng.gen_range(-2.0f32..2.0)).to_le_bytes()).collect();
        let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let wb = ternlm_kernels::matmul::WeightBytes::owned(w);
        let mut simd = QMatrix::with_backend(GgmlType::F16, wb.clone(), rows, k, Backend::Avx2).unwrap();
        let mut refm = QMatrix::with_backend(GgmlType::F16, wb, rows, k, Backend::Scalar).unwrap();
        simd.use_f32_activations();
        refm.use_f32_activations();
        let (mut o1, mut o2) = (vec![0f32; rows], vec![0f32; rows]);
        simd.matmul_f32(&x, &mut o1, &pool);
        refm.matmul_f32(&x, &mut o2, &pool);
        let mut row = vec![0f32; k];
        for r in 0..rows {
            refm.dequantize_row(r, &mut row);
            let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let exact: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((o1[r] - o2[r]).abs() <= 1e-5 * (1.0 + mag), "k={k} row {r}: {} vs {}", o1[r], o2[r]);
            assert!((o1[r] as f64 - exact).abs() <= 1e-5 * (1.0 + mag as f64), "k={k} row {r}: {} vs {exact}", o1[r]);
        }
    }
}
