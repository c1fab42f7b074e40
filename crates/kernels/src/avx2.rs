//! AVX2 (+FMA, F16C) row dots. Integer types compute each block's integer sum with `maddubs`/`madd` (exact: no
//! int16 saturation is possible for the value ranges involved, see each kernel) and reuse the scalar float
//! epilogues, so their results are bit-identical to [`crate::scalar`]. Float types (F32/F16/BF16) use FMA and
//! agree with the reference to rounding.
//!
//! Every function here is `unsafe` because it requires AVX2/FMA/F16C; [`crate::dot::Kernels`] only hands them out
//! after `is_x86_feature_detected!` says the CPU has those features. Memory accesses go through bounds-checked
//! slices before any unaligned load.

use crate::scalar::*;
use crate::{f16_at, f32_at, GgmlType};
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn load(b: &[u8]) -> __m256i {
    let b = &b[..32];
    // SAFETY: `b` has at least 32 bytes (checked by the slice above); loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
}

#[inline(always)]
unsafe fn load16(b: &[u8]) -> __m128i {
    let b = &b[..16];
    // SAFETY: 16 bytes checked by the slice above.
    unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
}

/// Exact f16 load with the F16C instruction (same value as `half`'s conversion).
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn h16(b: &[u8], i: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([b[i], b[i + 1]]) as i32)))
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[inline(always)]
unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// BitNet's per-token int8 quantization of one activation row (`act::quantize_row` for `I8PerToken`): the same IEEE
/// steps per element as the scalar code (max of |x|, x·s rounded half to even, clamped to [-128, 127]), so the same
/// bytes for finite inputs. It was ~3% of a 512-token prompt's profile as scalar code.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_i8_per_token(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    assert!(out.len() >= k + 8, "activation row buffer too short");
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= k {
        // SAFETY: i + 8 <= k = x.len().
        m = _mm256_max_ps(m, _mm256_and_ps(unsafe { _mm256_loadu_ps(xp.add(i)) }, abs));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = x[i..].iter().chain(&lanes).fold(0f32, |m, v| m.max(v.abs()));
    let s = 127.0 / amax.max(1e-5);
    let (sv, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut sum = _mm256_setzero_si256();
    let mut i = 0;
    while i + 32 <= k {
        let q: [__m256i; 4] = std::array::from_fn(|j| {
            // SAFETY: i + 8j + 8 <= k = x.len().
            let v = _mm256_mul_ps(unsafe { _mm256_loadu_ps(xp.add(i + 8 * j)) }, sv);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo))
        });
        sum = _mm256_add_epi32(_mm256_add_epi32(sum, _mm256_add_epi32(q[0], q[1])), _mm256_add_epi32(q[2], q[3]));
        // Values are within [-128, 127], so the saturating packs are exact; they interleave 128-bit lanes, which
        // the permutation puts back in order.
        let b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        // SAFETY: i + 32 <= k <= out.len().
        unsafe { _mm256_storeu_si256(op.add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(b, order)) };
        i += 32;
    }
    let mut total = hsum_i32(sum);
    for j in i..k {
        let q = crate::act::round_even(x[j] * s).clamp(-128.0, 127.0) as i32;
        total += q;
        out[j] = q as i8 as u8;
    }
    out[k..k + 4].copy_from_slice(&s.to_le_bytes());
    out[k + 4..k + 8].copy_from_slice(&total.to_le_bytes());
}

/// Unsigned bytes `u` (each ≤ 128) times signed bytes `s`, summed to 8 × i32. Pairs sum to at most 2·128·128 in
/// magnitude only when `s` holds -128, which no activation quantizer here produces (they stay within ±127), so
/// `maddubs` never saturates.
#[inline(always)]
unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Signed × signed bytes via the sign trick; `y` must not contain -128 (activations never do).
#[inline(always)]
unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256i {
    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// 16 packed bytes → 32 nibbles: low nibbles in the low lane (values 0..16), high nibbles in the high lane.
#[inline(always)]
unsafe fn nibbles_32(qs: &[u8]) -> __m256i {
    let t = load16(qs);
    let v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// 32 bits → 32 bytes of 0xFF (bit set) or 0x00.
#[inline(always)]
unsafe fn bytes_from_bits_32(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q4_0_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(mul_sum_i8(q4_0_vals(w), load(&a[2..])))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q4_1_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(mul_sum_us8(q4_1_vals(w), load(&a[4..])))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q5_0_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(mul_sum_i8(q5_0_vals(w), load(&a[2..])))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q5_1_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(mul_sum_us8(q5_1_vals(w), load(&a[4..])))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q8_0_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(mul_sum_i8(q8_0_vals(w), load(&a[2..])))
}

/// Weight bytes of a Q4_0 block as signed values (nibble − 8).
#[inline(always)]
unsafe fn q4_0_vals(w: &[u8]) -> __m256i {
    _mm256_sub_epi8(nibbles_32(&w[2..]), _mm256_set1_epi8(8))
}

/// Weight bytes of a Q5_0 block as signed values (5-bit value − 16): a clear fifth bit ORs in 0xF0, which as i8 is
/// (nibble − 16); a set bit leaves nibble + 16 − 16.
#[inline(always)]
unsafe fn q5_0_vals(w: &[u8]) -> __m256i {
    let hi = bytes_from_bits_32(u32::from_le_bytes([w[2], w[3], w[4], w[5]]));
    _mm256_or_si256(nibbles_32(&w[6..]), _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8)))
}

/// Weight bytes of a Q8_0 block (signed).
#[inline(always)]
unsafe fn q8_0_vals(w: &[u8]) -> __m256i {
    load(&w[2..])
}

/// Weight bytes of a Q4_1 block (unsigned nibbles; the block minimum is in the epilogue).
#[inline(always)]
unsafe fn q4_1_vals(w: &[u8]) -> __m256i {
    nibbles_32(&w[4..])
}

/// Weight bytes of a Q5_1 block (unsigned 5-bit values).
#[inline(always)]
unsafe fn q5_1_vals(w: &[u8]) -> __m256i {
    let hi = bytes_from_bits_32(u32::from_le_bytes([w[4], w[5], w[6], w[7]]));
    _mm256_or_si256(nibbles_32(&w[8..]), _mm256_and_si256(hi, _mm256_set1_epi8(0x10)))
}

/// A row of 32-weight blocks (`WB` bytes, f16 scale first, and for `MIN` types the f16 minimum next) × the matching
/// activation blocks (`AB` bytes, values at `AOFF`: Q8_0, or Q8_1 with its f16 sum at byte 2), equal to the scalar
/// reference bit for bit: block sums are exact integers, each block's term is `(d_w · d_a) · isum` (`+ m_w · s_a`
/// for `MIN`) in f32 as there, and the terms are added in block order. Eight blocks at a time share one horizontal
/// reduction (a hadd tree) and one vector conversion and scaling, which is what lets these rows stream near the
/// memory bandwidth instead of at half of it (a horizontal sum per 32 weights was most of the work).
#[inline(always)]
unsafe fn dot_blocks8<const WB: usize, const AB: usize, const AOFF: usize, const SIGNED: bool, const MIN: bool>(
    w: &[u8],
    a: &[u8],
    k: usize,
    unpack: impl Fn(&[u8]) -> __m256i,
) -> f32 {
    let nb = k / 32;
    let (w, a) = (&w[..WB * nb], &a[..AB * nb]);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // Functions rather than closures below: the closures stayed out of line (tests/hot_kernels.rs).
    #[inline(always)]
    unsafe fn isum32<const SIGNED: bool>(x: __m256i, y: __m256i) -> __m256i {
        if SIGNED {
            mul_sum_i8(x, y)
        } else {
            mul_sum_us8(x, y)
        }
    }
    /// The f16 at byte `o` of eight consecutive `stride`-byte blocks from `p`, as f32 lanes.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, stride: usize, o: usize) -> __m256 {
        let d = |j: usize| std::ptr::read_unaligned(p.add(stride * j + o) as *const i16);
        _mm256_cvtph_ps(_mm_setr_epi16(d(0), d(1), d(2), d(3), d(4), d(5), d(6), d(7)))
    }
    let mut acc = 0f32;
    let mut b = 0;
    while b + 8 <= nb {
        for line in 0..(8 * WB).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_NTA>(wp.wrapping_add(WB * b + PREFETCH_BYTES + 64 * line) as *const i8);
        }
        // A plain loop, not `std::array::from_fn` (see `k_quant_rows4`).
        let mut v = [_mm256_setzero_si256(); 8];
        for (j, v) in v.iter_mut().enumerate() {
            let c = b + j;
            *v = isum32::<SIGNED>(unpack(&w[WB * c..WB * c + WB]), load(&a[AB * c + AOFF..]));
        }
        let h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        let isum = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h0123, h4567),
            _mm256_permute2x128_si256::<0x31>(h0123, h4567),
        );
        // SAFETY: blocks b..b+8 lie within the first WB·nb / AB·nb bytes of the rows (sliced above), and each
        // block's first four bytes are its f16 scale and (MIN types) minimum or sum.
        let (wb, ab) = unsafe { (wp.add(WB * b), ap.add(AB * b)) };
        let d = unsafe { _mm256_mul_ps(f16x8(wb, WB, 0), f16x8(ab, AB, 0)) };
        let mut terms = _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum));
        if MIN {
            // SAFETY: as above.
            terms = _mm256_add_ps(terms, unsafe { _mm256_mul_ps(f16x8(wb, WB, 2), f16x8(ab, AB, 2)) });
        }
        let mut t = [0f32; 8];
        // SAFETY: `t` holds eight f32.
        unsafe { _mm256_storeu_ps(t.as_mut_ptr(), terms) };
        for t in t {
            acc += t;
        }
        b += 8;
    }
    for b in b..nb {
        let (x, y) = (&w[WB * b..WB * b + WB], &a[AB * b..AB * b + AB]);
        let isum = hsum_i32(isum32::<SIGNED>(unpack(x), load(&y[AOFF..])));
        acc +=
            if MIN { epi_q8_1_with(x, y, isum, |b, i| h16(b, i)) } else { epi_q8_0_with(x, y, isum, |b, i| h16(b, i)) };
    }
    acc
}

/// Q8_0 row × Q8_0 activations (e.g. a Q8_0 output head); see [`dot_blocks8`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    dot_blocks8::<34, 34, 2, true, false>(w, a, k, |w| q8_0_vals(w))
}

/// Q4_K/Q5_K: Σ_j scale_j · Σ (value · a) over the eight 32-wide sub-blocks. Per 16-bit lane, maddubs pairs are at
/// most 2·31·127 = 7874; times a 6-bit scale in madd, at most 2·7874·63 ≈ 1e6 per lane per sub-block.
#[inline(always)]
unsafe fn k_scaled_sum(vals: [__m256i; 8], w_scales: &[u8], a: &[u8]) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for (j, v) in vals.into_iter().enumerate() {
        let (sc, _) = scale_min_k4(j, w_scales);
        let p = _mm256_maddubs_epi16(v, load(&a[4 + 32 * j..]));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(sc as i16)));
    }
    hsum_i32(acc)
}

#[inline(always)]
fn k_mins(w_scales: &[u8], a: &[u8]) -> i32 {
    // A plain loop: the iterator's `sum` stayed an out-of-line `fold` per block (tests/hot_kernels.rs).
    let mut m = 0;
    for j in 0..8 {
        m += scale_min_k4(j, w_scales).1 as i32 * q8k_bsum32(a, j);
    }
    m
}

/// A Q4_K/Q5_K block's two integer sums (Σ scale·value·a, Σ min·bsum) from its unpacked values `vals`, the block
/// `w` (scales at bytes 4..16) and the Q8_K block `a`. Called directly by the decode and prompt loops: the
/// target-feature `isum_*` functions (kept for the scalar-equality tests) stayed out of line there, a call per block.
#[inline(always)]
unsafe fn k_min_sums(vals: [__m256i; 8], w: &[u8], a: &[u8]) -> (i32, i32) {
    (k_scaled_sum(vals, &w[4..16], a), k_mins(&w[4..16], a))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q4_k_avx2(w: &[u8], a: &[u8]) -> (i32, i32) {
    k_min_sums(q4_k_vals(w), w, a)
}

/// A Q4_K block's 256 values as eight 32-byte vectors (sub-block order).
#[inline(always)]
unsafe fn q4_k_vals(w: &[u8]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut vals = [_mm256_setzero_si256(); 8];
    for g in 0..4 {
        let q = load(&w[16 + 32 * g..]);
        vals[2 * g] = _mm256_and_si256(q, m4);
        vals[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
    vals
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q5_k_avx2(w: &[u8], a: &[u8]) -> (i32, i32) {
    k_min_sums(q5_k_vals(w), w, a)
}

/// A Q5_K block's 256 values as eight 32-byte vectors (sub-block order).
#[inline(always)]
unsafe fn q5_k_vals(w: &[u8]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let qh = load(&w[16..]);
    let mut vals = [_mm256_setzero_si256(); 8];
    for g in 0..4 {
        let q = load(&w[48 + 32 * g..]);
        // Bit (2g) of each qh byte is the fifth bit of the low-nibble sub-block, bit (2g+1) of the high one.
        let h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g as i32)), one);
        let h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g as i32 + 1)), one);
        vals[2 * g] = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4));
        vals[2 * g + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_slli_epi16(h1, 4));
    }
    vals
}

/// Q6_K: values are (u6 − 32); Σ sc·(u6 − 32)·a = Σ sc·u6·a − 32·Σ sc·bsum16, the second term from the Q8_K
/// block's sixteen int16 partial sums in one madd. maddubs pairs ≤ 2·63·128 = 16128; madd with a signed 8-bit
/// scale ≤ 2·16128·128 ≈ 4.1e6 per lane per vector, eight vectors ≈ 3.3e7: no overflow.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_q6_k_avx2(w: &[u8], a: &[u8]) -> i32 {
    let (w, a) = (&w[..210], &a[..292]);
    // SAFETY: the slices above hold a whole Q6_K block and a whole Q8_K block.
    unsafe { hsum_i32(q6_k_block(w.as_ptr(), a.as_ptr())) }
}

/// Σ sc·(u6 − 32)·a over one Q6_K block (210 bytes at `w`) and one Q8_K block (292 bytes at `a`), as i32 lanes.
/// Caller guarantees both blocks are readable.
#[inline(always)]
unsafe fn q6_k_block(w: *const u8, a: *const u8) -> __m256i {
    q6_k_block_n::<1>(w, [a])[0]
}

/// [`q6_k_block`] for `N` activation blocks at once (prompts): the weights are unpacked and the scales spread once,
/// then used for every token. Each token's lanes are the exact integer sums, as for one.
#[inline(always)]
unsafe fn q6_k_block_n<const N: usize>(w: *const u8, a: [*const u8; N]) -> [__m256i; N] {
    let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    // The sixteen int8 scales widened once; sub-blocks 0–7 then sit in the low 128 bits, 8–15 in the high.
    let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(192) as *const __m128i));
    let halves = [_mm256_permute2x128_si256::<0x00>(s16, s16), _mm256_permute2x128_si256::<0x11>(s16, s16)];
    // Byte indices of int16 lane 0 repeated over the low 128 bits and of lane 1 over the high; + 4i picks lanes 2i
    // and 2i+1.
    let pick_pair = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
    );
    let mut acc = [_mm256_setzero_si256(); N];
    for (h, half) in halves.into_iter().enumerate() {
        let qa = ld(w.add(64 * h));
        let qb = ld(w.add(64 * h + 32));
        let hb = ld(w.add(128 + 32 * h));
        // High bit pairs moved to bits 4–5 of each byte (16-bit shifts are fine: the mask drops what crossed).
        let vals = [
            _mm256_or_si256(_mm256_and_si256(qa, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30)),
            _mm256_or_si256(_mm256_and_si256(qb, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), _mm256_and_si256(hb, m30)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30),
            ),
        ];
        for (i, v) in vals.into_iter().enumerate() {
            // Sub-blocks 2j and 2j+1 (j = 4h + i) cover this vector's low and high 16 values: their int16 scales
            // are lanes 2i and 2i+1 of `half`, spread over each 128-bit half by one in-lane byte shuffle.
            let pick = _mm256_add_epi8(pick_pair, _mm256_set1_epi8(4 * i as i8));
            let sc = _mm256_shuffle_epi8(half, pick);
            for (acc, a) in acc.iter_mut().zip(a) {
                let p = _mm256_maddubs_epi16(v, ld(a.add(4 + 128 * h + 32 * i)));
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, sc));
            }
        }
    }
    for (acc, a) in acc.iter_mut().zip(a) {
        let offset = _mm256_madd_epi16(ld(a.add(260)), s16);
        *acc = _mm256_sub_epi32(*acc, _mm256_slli_epi32(offset, 5));
    }
    acc
}

/// Q6_K row × Q8_K activations (the decode kernel, e.g. a Q6_K output head), equal to the scalar reference bit for
/// bit; see [`dot_k_row`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    // SAFETY (closure): the driver hands over whole 210-byte Q6_K and 292-byte Q8_K blocks.
    dot_k_row::<210, 208>(w, a, k, |wb, ab| unsafe { q6_k_block(wb.as_ptr(), ab.as_ptr()) })
}

/// Sums of four rows' i32 lanes, as one vector (lane r = row r). Integer adds, so any order gives the same value.
#[inline(always)]
unsafe fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
    let h = hadd4_i32(v);
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// Four vectors' i32 lanes folded into one: in each 128-bit half, lane r holds a partial sum of `v[r]`. Adding such
/// vectors and finally the two halves gives the four totals.
#[inline(always)]
unsafe fn hadd4_i32(v: [__m256i; 4]) -> __m256i {
    _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]))
}

/// Four per-token int8 activation rows' trailers (each row is k values, then its f32 scale and i32 sum) as lanes:
/// (scales, sums).
///
/// # Safety
/// Each pointer must address a row of at least k + 8 bytes.
#[inline(always)]
unsafe fn i8_trailers4(ap: [*const u8; 4], k: usize) -> (__m128, __m128i) {
    let t = ap.map(|a| std::ptr::read_unaligned(a.add(k) as *const [i32; 2]));
    (
        _mm_castsi128_ps(_mm_setr_epi32(t[0][0], t[1][0], t[2][0], t[3][0])),
        _mm_setr_epi32(t[0][1], t[1][1], t[2][1], t[3][1]),
    )
}

/// `scalar::epi_i2s` on four lanes, in the same IEEE operations: (Σcq − Σq) / s · w_scale.
#[inline(always)]
unsafe fn epi_i2s4(sum_cq: __m128i, s: __m128, sum_q: __m128i, w_scale: f32) -> [f32; 4] {
    let y = _mm_mul_ps(_mm_div_ps(_mm_cvtepi32_ps(_mm_sub_epi32(sum_cq, sum_q)), s), _mm_set1_ps(w_scale));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), y) };
    out
}

/// The f16 at byte `off` of each of four rows `rb` apart, as f32 lanes (exact conversions).
#[inline(always)]
unsafe fn h16_rows4(w: *const u8, rb: usize, off: usize) -> __m128 {
    let h = |r: usize| std::ptr::read_unaligned(w.add(r * rb + off) as *const u16) as i16;
    _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0))
}

/// Four consecutive rows (`rb` bytes apart, `WB`-byte blocks with their f16 scale at `DOFF`) × one Q8_K activation
/// row, for the types whose block term is `(d_w · d_a) · isum` (TQ1_0, TQ2_0; Q6_K decodes one row at a time, see
/// `Kernels::new`); `block` gives one block's integer sum as i32 lanes. The four rows' sums are reduced together and
/// each lane takes the scalar epilogue's IEEE steps in block order, so every row equals its single-row kernel bit for
/// bit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_quant_rows4<const WB: usize, const DOFF: usize>(
    w: &[u8],
    rb: usize,
    a: &[u8],
    k: usize,
    block: impl Fn(&[u8], &[u8]) -> __m256i,
) -> [f32; 4] {
    let nb = k / 256;
    assert!(
        k.is_multiple_of(256) && rb >= WB * nb && w.len() >= 3 * rb + WB * nb && a.len() >= 292 * nb,
        "rows or Q8_K activation too short"
    );
    let wp = w.as_ptr();
    // The next four rows, 4·WB bytes per block step, as in the I2_S four-row kernel.
    let next = wp.wrapping_add(4 * rb);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        for line in 0..(4 * WB).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_NTA>(next.wrapping_add(4 * WB * b + 64 * line) as *const i8);
        }
        // The activation block is the same for the four rows; its loads stay in L1 across them.
        let ab = &a[292 * b..292 * b + 292];
        // A plain loop: through `std::array::from_fn` LLVM stopped inlining the block sum once the file grew (an
        // out-of-line call per row and block cost TQ2_0 decode ~30%), and four calls written out were unrolled into
        // one schedule that spilled TQ1_0's trit vectors (~25% slower).
        let mut v = [_mm256_setzero_si256(); 4];
        for (r, v) in v.iter_mut().enumerate() {
            *v = block(&w[r * rb + WB * b..r * rb + WB * b + WB], ab);
        }
        let isum = hsum4_i32(v);
        // SAFETY: each row's block holds its f16 scale at DOFF (lengths asserted above).
        let d_w = unsafe { h16_rows4(wp.add(WB * b), rb, DOFF) };
        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_mul_ps(d_w, _mm_set1_ps(f32_at(ab, 0))), _mm_cvtepi32_ps(isum)));
    }
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// Σ (t − 1)·q over one ternary block (trits 0..2 as eight 32-byte vectors) against a Q8_K activation block, as
/// i32 lanes. The eight maddubs results add up in int16 (each lane at most 2·2·127, so 8·508 = 4064), the block's
/// sixteen int16 partial sums of q are subtracted lane-wise (their total is Σq, each at most 16·127), then one
/// widening: exact, and one reduction per block instead of one per vector.
#[inline(always)]
unsafe fn tq_q8k_block(trits: [__m256i; 8], a: &[u8]) -> __m256i {
    let a = &a[..292];
    let mut p = _mm256_setzero_si256();
    for (i, t) in trits.into_iter().enumerate() {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(t, load(&a[4 + 32 * i..])));
    }
    _mm256_madd_epi16(_mm256_sub_epi16(p, load(&a[260..])), _mm256_set1_epi16(1))
}

/// One row of `WB`-byte blocks (f16 scale at `DOFF`) × Q8_K activations, for the types whose block term is
/// `(d_w · d_a) · isum` (Q6_K, TQ1_0, TQ2_0; `block` gives one block's integer sum as i32 lanes). Equal to the scalar
/// reference bit for bit: exact block sums, each block's term in f32, added in block order. Four blocks share one
/// horizontal reduction and one conversion and scaling (a reduction per block was a fifth of TQ2_0's decode work),
/// and weights are prefetched like the other streaming kernels.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k_row<const WB: usize, const DOFF: usize>(
    w: &[u8],
    a: &[u8],
    k: usize,
    block_sum: impl Fn(&[u8], &[u8]) -> __m256i,
) -> f32 {
    let nb = k / 256;
    let (w, a) = (&w[..WB * nb], &a[..292 * nb]);
    let wp = w.as_ptr();
    let block = |b: usize| -> __m256i {
        // Every line of the block PREFETCH_BYTES ahead (blocks are contiguous, so lines a block straddles are
        // covered by its neighbours' prefetches).
        for line in 0..WB.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_NTA>(wp.wrapping_add(WB * b + PREFETCH_BYTES + 64 * line) as *const i8);
        }
        block_sum(&w[WB * b..WB * b + WB], &a[292 * b..292 * b + 292])
    };
    let mut acc = 0f32;
    let mut b = 0;
    while b + 4 <= nb {
        // A plain loop, not `std::array::from_fn` (see `k_quant_rows4`).
        let mut v = [_mm256_setzero_si256(); 4];
        for (j, v) in v.iter_mut().enumerate() {
            *v = block(b + j);
        }
        let isum = hsum4_i32(v);
        let d_w = _mm_setr_ps(
            h16(w, WB * b + DOFF),
            h16(w, WB * (b + 1) + DOFF),
            h16(w, WB * (b + 2) + DOFF),
            h16(w, WB * (b + 3) + DOFF),
        );
        let d_a = _mm_setr_ps(
            f32_at(a, 292 * b),
            f32_at(a, 292 * (b + 1)),
            f32_at(a, 292 * (b + 2)),
            f32_at(a, 292 * (b + 3)),
        );
        let terms = _mm_mul_ps(_mm_mul_ps(d_w, d_a), _mm_cvtepi32_ps(isum));
        let mut t = [0f32; 4];
        // SAFETY: `t` holds four f32.
        unsafe { _mm_storeu_ps(t.as_mut_ptr(), terms) };
        for t in t {
            acc += t;
        }
        b += 4;
    }
    for b in b..nb {
        acc += epi_k(h16(w, WB * b + DOFF), &a[292 * b..], hsum_i32(block(b)));
    }
    acc
}

/// TQ1_0 / TQ2_0 × Q8_K decode over four rows per call. Callers must have checked AVX2, FMA and F16C.
pub(crate) fn tq_rows4(ty: GgmlType) -> Option<crate::dot::RowsDot4> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tq1(w: &[u8], rb: usize, a: &[u8], k: usize) -> [f32; 4] {
        k_quant_rows4::<54, 52>(w, rb, a, k, |wb, ab| tq_q8k_block(tq1_0_trit_vecs(wb), ab))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tq2(w: &[u8], rb: usize, a: &[u8], k: usize) -> [f32; 4] {
        k_quant_rows4::<66, 64>(w, rb, a, k, |wb, ab| tq_q8k_block(tq2_0_trit_vecs(wb), ab))
    }
    fn f1(w: &[u8], rb: usize, a: &[u8], k: usize, _s: f32) -> [f32; 4] {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { tq1(w, rb, a, k) }
    }
    fn f2(w: &[u8], rb: usize, a: &[u8], k: usize, _s: f32) -> [f32; 4] {
        // SAFETY: as above.
        unsafe { tq2(w, rb, a, k) }
    }
    match ty {
        GgmlType::TQ1_0 => Some(f1),
        GgmlType::TQ2_0 => Some(f2),
        _ => None,
    }
}

// Closures inherit the target features of the function that defines them, so the block decoders inline.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tq1_0_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    dot_k_row::<54, 52>(w, a, k, |wb, ab| tq_q8k_block(tq1_0_trit_vecs(wb), ab))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tq2_0_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    dot_k_row::<66, 64>(w, a, k, |wb, ab| tq_q8k_block(tq2_0_trit_vecs(wb), ab))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_tq2_0_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(tq_q8k_block(tq2_0_trit_vecs(w), a))
}

/// Trits of 32 TQ1_0 bytes with a power of 3 per 16-bit lane (both bytes of a lane share it):
/// ((q·3ⁿ mod 256)·3) >> 8, byte-wise via 16-bit multiplies.
#[inline(always)]
unsafe fn tq1_trits_by(q: __m256i, p: __m256i) -> __m256i {
    let lo_mask = _mm256_set1_epi16(0x00FF);
    let lo = _mm256_and_si256(_mm256_mullo_epi16(_mm256_and_si256(q, lo_mask), p), lo_mask);
    let hi = _mm256_andnot_si256(lo_mask, _mm256_mullo_epi16(_mm256_andnot_si256(lo_mask, q), p));
    let qn = _mm256_or_si256(lo, hi);
    let three = _mm256_set1_epi16(3);
    let t_lo = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_and_si256(qn, lo_mask), three), 8);
    let t_hi = _mm256_andnot_si256(lo_mask, _mm256_mullo_epi16(_mm256_srli_epi16(qn, 8), three));
    _mm256_or_si256(t_lo, t_hi)
}

/// Trits of bytes that already hold `q·3ⁿ mod 256`: ⌊3x/256⌋ is 1 from x = 86 and 2 from x = 171, so two unsigned
/// comparisons (signed ones on x ^ 0x80) give it without a multiply.
#[inline(always)]
unsafe fn tq1_trits_of_scaled(x: __m256i) -> __m256i {
    let xs = _mm256_xor_si256(x, _mm256_set1_epi8(i8::MIN));
    let ge86 = _mm256_cmpgt_epi8(xs, _mm256_set1_epi8((85u8 ^ 0x80) as i8));
    let ge171 = _mm256_cmpgt_epi8(xs, _mm256_set1_epi8((170u8 ^ 0x80) as i8));
    // Masks are -1 where true: 0 − m86 − m171 counts the thresholds passed.
    _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), ge86), ge171)
}

/// `x·3 mod 256` per byte, with adds.
#[inline(always)]
unsafe fn times3_bytes(x: __m256i) -> __m256i {
    _mm256_add_epi8(x, _mm256_add_epi8(x, x))
}

/// The eight 32-trit vectors of a TQ1_0 block, in weight order (`scalar::tq1_0_trits`). Bytes 0..32 give five
/// vectors (trit n → weights 32n..32n+32). Bytes 32..48 give 16 weights per trit, so trits n and n+1 side by side
/// (one 128-bit lane each) are weights 160+16n..160+16n+32. The last vector is trit 4 of those 16 bytes next to the
/// 16 weights of the 4 `qh` bytes (trit n of byte j → weight 240+4n+j): `qh` repeated four times, each copy
/// multiplied by its own power of 3. Trit n of byte q is ⌊3·(q·3ⁿ mod 256) / 256⌋; the scaled bytes come from
/// byte-wise adds (×3 per step) and the trits from comparisons, except in the last vector, whose lanes need
/// different powers (16-bit multiplies there).
#[inline(always)]
unsafe fn tq1_0_trit_vecs(w: &[u8]) -> [__m256i; 8] {
    let q = load(w);
    let w16 = &w[32..48];
    // SAFETY: `w16` is exactly 16 bytes; loadu has no alignment requirement.
    let q16 = unsafe { _mm_loadu_si128(w16.as_ptr() as *const __m128i) };
    let x1 = times3_bytes(q);
    let x2 = times3_bytes(x1);
    let x3 = times3_bytes(x2);
    let x4 = times3_bytes(x3);
    let q16x3 = _mm_add_epi8(q16, _mm_add_epi8(q16, q16));
    let y01 = _mm256_set_m128i(q16x3, q16);
    let y23 = times3_bytes(times3_bytes(y01));
    let qh = _mm_set1_epi32(i32::from_le_bytes([w[48], w[49], w[50], w[51]]));
    [
        tq1_trits_of_scaled(q),
        tq1_trits_of_scaled(x1),
        tq1_trits_of_scaled(x2),
        tq1_trits_of_scaled(x3),
        tq1_trits_of_scaled(x4),
        tq1_trits_of_scaled(y01),
        tq1_trits_of_scaled(y23),
        tq1_trits_by(
            _mm256_set_m128i(qh, q16),
            _mm256_setr_epi16(81, 81, 81, 81, 81, 81, 81, 81, 1, 1, 3, 3, 9, 9, 27, 27),
        ),
    ]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_tq1_0_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(tq_q8k_block(tq1_0_trit_vecs(w), a))
}

/// Σ (t − 1)·q over one TQ block against 256 raw int8 activations (per-token semantics). Both Σ t·q and Σ q add up
/// in int16 (at most 8·2·2·127 = 4064 and 8·2·127 = 2032 per lane), are subtracted there, and widen once: exact.
#[inline(always)]
unsafe fn tq_raw_block_isum(trit_vecs: [__m256i; 8], a: &[u8]) -> i32 {
    let a = &a[..256];
    let ones = _mm256_set1_epi8(1);
    let (mut p, mut sq) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for (i, t) in trit_vecs.into_iter().enumerate() {
        let y = load(&a[32 * i..]);
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(t, y));
        sq = _mm256_add_epi16(sq, _mm256_maddubs_epi16(ones, y));
    }
    hsum_i32(_mm256_madd_epi16(_mm256_sub_epi16(p, sq), _mm256_set1_epi16(1)))
}

/// The eight 32-trit vectors of a TQ2_0 block, in weight order (byte j of half h holds weights 128h + j + 32l at
/// bits 2l).
#[inline(always)]
unsafe fn tq2_0_trit_vecs(w: &[u8]) -> [__m256i; 8] {
    let m2 = _mm256_set1_epi8(3);
    let (q0, q1) = (load(w), load(&w[32..]));
    [
        _mm256_and_si256(q0, m2),
        _mm256_and_si256(_mm256_srli_epi16::<2>(q0), m2),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q0), m2),
        _mm256_and_si256(_mm256_srli_epi16::<6>(q0), m2),
        _mm256_and_si256(q1, m2),
        _mm256_and_si256(_mm256_srli_epi16::<2>(q1), m2),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q1), m2),
        _mm256_and_si256(_mm256_srli_epi16::<6>(q1), m2),
    ]
}

/// TQ1_0 / TQ2_0 × per-token int8 activations (see `scalar::dot_row_tq_per_token`). Callers must have checked
/// AVX2, FMA and F16C.
pub(crate) fn tq_per_token_row_dot(ty: GgmlType) -> crate::dot::RowDot {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tq2(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
        let mut acc = 0f32;
        for (b, wb) in w[..k / 256 * 66].chunks_exact(66).enumerate() {
            acc += h16(wb, 64) * tq_raw_block_isum(tq2_0_trit_vecs(wb), &a[256 * b..]) as f32;
        }
        acc / crate::f32_at(a, k)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tq1(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
        let mut acc = 0f32;
        for (b, wb) in w[..k / 256 * 54].chunks_exact(54).enumerate() {
            acc += h16(wb, 52) * tq_raw_block_isum(tq1_0_trit_vecs(wb), &a[256 * b..]) as f32;
        }
        acc / crate::f32_at(a, k)
    }
    fn f2(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { tq2(w, a, k, s) }
    }
    fn f1(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
        // SAFETY: as above.
        unsafe { tq1(w, a, k, s) }
    }
    if ty == GgmlType::TQ1_0 {
        f1
    } else {
        f2
    }
}

/// Four-token twin of the TQ1_0 [`tq_per_token_row_dot`]: each block's trits are decoded once for four activation
/// rows, and each token's sum runs in the single-token kernel's order, so the results are the same bits.
pub(crate) fn tq1_0_per_token_row_dot4() -> crate::dot::RowDot4 {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tq1(w: &[u8], a: [&[u8]; 4], k: usize) -> [f32; 4] {
        let mut acc = [0f32; 4];
        for (b, wb) in w[..k / 256 * 54].chunks_exact(54).enumerate() {
            let t = tq1_0_trit_vecs(wb);
            let d = h16(wb, 52);
            for (acc, a) in acc.iter_mut().zip(a) {
                *acc += d * tq_raw_block_isum(t, &a[256 * b..]) as f32;
            }
        }
        let mut out = [0f32; 4];
        for (o, (acc, a)) in out.iter_mut().zip(acc.into_iter().zip(a)) {
            *o = acc / crate::f32_at(a, k);
        }
        out
    }
    fn f1(w: &[u8], a: [&[u8]; 4], k: usize, _s: f32) -> [f32; 4] {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { tq1(w, a, k) }
    }
    f1
}

/// Σ c·q over one I2_S block of 128 weights. Codes are 0..2 (3 is mapped to 1); four maddubs results summed in
/// int16 stay within 4·2·2·127 = 2032, then widen to int32 — exact, unlike an int16 accumulation across blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn isum_i2s_avx2(w: &[u8], a: &[u8]) -> i32 {
    hsum_i32(i2s_block_acc(w, a))
}

#[inline(always)]
unsafe fn i2s_block_acc(w: &[u8], a: &[u8]) -> __m256i {
    i2s_block_acc_fix::<true>(w, a)
}

/// The four 2-bit code planes of a block (weights 0..32, 32..64, 64..96, 96..128). With `FIX`, the unused code 3
/// is mapped to 1 (weight 0); without it the caller guarantees the tensor has no code 3 (checked at load).
#[inline(always)]
unsafe fn i2s_codes_avx2<const FIX: bool>(w: &[u8]) -> [__m256i; 4] {
    let m2 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let q = load(w);
    let mut out = [_mm256_setzero_si256(); 4];
    for (g, shift) in [6, 4, 2, 0].into_iter().enumerate() {
        let c = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(shift)), m2);
        out[g] = if FIX {
            let three = _mm256_and_si256(_mm256_and_si256(c, _mm256_srli_epi16(c, 1)), one);
            _mm256_xor_si256(c, _mm256_add_epi8(three, three))
        } else {
            c
        };
    }
    out
}

#[inline(always)]
unsafe fn i2s_block_acc_fix<const FIX: bool>(w: &[u8], a: &[u8]) -> __m256i {
    let c = i2s_codes_avx2::<FIX>(w);
    let mut p = _mm256_setzero_si256();
    for (g, c) in c.into_iter().enumerate() {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c, load(&a[32 * g..])));
    }
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// How far ahead of its loads a streaming kernel prefetches weights (bytes). Measured on this 2-core Zen 3 in one
/// process, alternating distances over 30 passes of 600 MB (medians): I2_S 24.8 GB/s at 768 B, 27.6 at 2048,
/// 27.8 at 2560, no better beyond; Q6_K 23.1 / 26.1 / 26.6 (3072); Q8_0 25.3 / 27.4 / 28.0 (3072).
const PREFETCH_BYTES: usize = 2048;
/// The prefetches are non-temporal (weights are read once per token): in the same A/B, 2–6% faster than T0 for
/// I2_S, Q6_K and F16 kernels alone; whole-model 2B4T generation A/B'd within the machine's noise (±5%).
///
/// The F16 × f32 head dot is the exception: 25.9 GB/s at 768 B, 26.0 at 1024, 22.5 at 2048 (its f32 activation row
/// is 10 KB of L1 on 2B4T, and a longer run of prefetched lines competes with it).
const PREFETCH_BYTES_F16: usize = 768;

/// I2_S for tensors without code 3: single-token and four-token dots (each token's integer sum is exact, and the
/// epilogue is the shared one, so results equal the scalar reference bit for bit).
pub(crate) fn i2s_clean_kernels() -> (crate::dot::RowDot, crate::dot::RowDot4) {
    // Both keep partial sums in int16 for several blocks before widening (bounds at each loop): exact, and one
    // widening per group of blocks instead of one per block. Decode streams each weight once, so its loop is kept
    // to the vector work: raw pointers (the bounds are checked once, above the loop) and a prefetch ahead.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn one(w: &[u8], a: &[u8], k: usize, scale: f32) -> f32 {
        assert!(k.is_multiple_of(128) && w.len() >= k / 4 && a.len() >= k + 8, "I2_S row or activation too short");
        let ones = _mm256_set1_epi16(1);
        let (wp, ap) = (w.as_ptr(), a.as_ptr());
        let n_blocks = k / 128;
        // SAFETY (every load below): block i reads w[32i..32i+32] and a[128i..128i+128], i < n_blocks, within
        // the lengths asserted above. The prefetch address may lie past the end; prefetches never fault.
        // Codes are read with one shift: `q & 3` and `(q >> 4) & 3` are planes 3 and 1, while `q & 12` and
        // `(q >> 4) & 12` are 4 × planes 2 and 0. Those two maddubs products are 4× too large and are summed apart
        // (each lane of them is a multiple of 4), then divided by 4 exactly when widened.
        let m3 = _mm256_set1_epi8(3);
        let m12 = _mm256_set1_epi8(12);
        let block = |i: usize| -> (__m256i, __m256i) {
            let q = unsafe { _mm256_loadu_si256(wp.add(32 * i) as *const __m256i) };
            let t = _mm256_srli_epi16::<4>(q);
            let ab = unsafe { ap.add(128 * i) };
            let ld = |o: usize| unsafe { _mm256_loadu_si256(ab.add(o) as *const __m256i) };
            let x1 = _mm256_add_epi16(
                _mm256_maddubs_epi16(_mm256_and_si256(t, m3), ld(32)),
                _mm256_maddubs_epi16(_mm256_and_si256(q, m3), ld(96)),
            );
            let x4 = _mm256_add_epi16(
                _mm256_maddubs_epi16(_mm256_and_si256(t, m12), ld(0)),
                _mm256_maddubs_epi16(_mm256_and_si256(q, m12), ld(64)),
            );
            (x1, x4)
        };
        let (mut acc1, mut acc4) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut i = 0;
        while i < n_blocks {
            // Up to 7 blocks in int16: |p4| <= 7·2·2·(8·128) = 28672 even for an activation of -128, so exact.
            let end = (i + 7).min(n_blocks);
            let (mut p1, mut p4) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            while i < end {
                _mm_prefetch::<_MM_HINT_NTA>(wp.wrapping_add(32 * i + PREFETCH_BYTES) as *const i8);
                let (x1, x4) = block(i);
                p1 = _mm256_add_epi16(p1, x1);
                p4 = _mm256_add_epi16(p4, x4);
                i += 1;
            }
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
            acc4 = _mm256_add_epi32(acc4, _mm256_madd_epi16(p4, ones));
        }
        let acc = _mm256_add_epi32(acc1, _mm256_srai_epi32::<2>(acc4));
        epi_i2s(a, k, hsum_i32(acc), scale)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn four(w: &[u8], a: [&[u8]; 4], k: usize, scale: f32) -> [f32; 4] {
        assert!(
            k.is_multiple_of(128) && w.len() >= k / 4 && a.iter().all(|a| a.len() >= k + 8),
            "I2_S row or activation too short"
        );
        let ones = _mm256_set1_epi16(1);
        let wp = w.as_ptr();
        let ap = a.map(|a| a.as_ptr());
        let n_blocks = k / 128;
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut i = 0;
        while i < n_blocks {
            // Up to 8 blocks in int16 per token (32 maddubs results of at most 2·2·128 = 512): exact.
            let end = (i + 8).min(n_blocks);
            let mut p = [_mm256_setzero_si256(); 4];
            while i < end {
                // SAFETY: block i reads w[32i..32i+32] and a[j][128i..128i+128], i < n_blocks, within the lengths
                // asserted above.
                let c = i2s_codes_avx2::<false>(unsafe { std::slice::from_raw_parts(wp.add(32 * i), 32) });
                for (j, p) in p.iter_mut().enumerate() {
                    let aj = unsafe { ap[j].add(128 * i) };
                    for (g, c) in c.iter().enumerate() {
                        let av = unsafe { _mm256_loadu_si256(aj.add(32 * g) as *const __m256i) };
                        *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(*c, av));
                    }
                }
                i += 1;
            }
            for (acc, p) in acc.iter_mut().zip(p) {
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, ones));
            }
        }
        // SAFETY: each activation row holds k + 8 bytes (asserted above).
        let (s, sum_q) = unsafe { i8_trailers4(ap, k) };
        epi_i2s4(hsum4_i32(acc), s, sum_q, scale)
    }
    fn f(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { one(w, a, k, s) }
    }
    fn g(w: &[u8], a: [&[u8]; 4], k: usize, s: f32) -> [f32; 4] {
        // SAFETY: as above.
        unsafe { four(w, a, k, s) }
    }
    (f, g)
}

/// Clean I2_S (no code 3), one token, four consecutive rows at once: decode reads each activation vector once for
/// four rows and finishes the four rows in one reduction and one vector epilogue. The per-row work outside the
/// block loop (call, horizontal sum, division) was ~20% of a 2560-weight row in cache, which put the single-row
/// kernel's ceiling (~32 GB/s on two Zen 3 cores) near DRAM speed. Each row's integer sum is the single-row
/// kernel's, and the epilogue the same IEEE operations, so results are the same bits.
pub(crate) fn i2s_clean_rows4() -> crate::dot::RowsDot4 {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4(w: &[u8], rb: usize, a: &[u8], k: usize, scale: f32) -> [f32; 4] {
        assert!(
            k.is_multiple_of(128) && rb >= k / 4 && w.len() >= 3 * rb + k / 4 && a.len() >= k + 8,
            "I2_S rows or activation too short"
        );
        let ones = _mm256_set1_epi16(1);
        let m3 = _mm256_set1_epi8(3);
        let m12 = _mm256_set1_epi8(12);
        let (wp, ap) = (w.as_ptr(), a.as_ptr());
        let n_blocks = k / 128;
        // The next four rows follow these; each block step reads 4 × 32 bytes, so prefetching 128 bytes of the
        // next group per step covers it exactly, one group ahead (2.5 KB for 2560-weight rows).
        let next = wp.wrapping_add(4 * rb);
        let (mut acc1, mut acc4) = ([_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4]);
        let mut i = 0;
        while i < n_blocks {
            // Up to 7 blocks in int16, as in the single-row kernel (|p4| <= 28672).
            let end = (i + 7).min(n_blocks);
            let (mut p1, mut p4) = ([_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4]);
            while i < end {
                _mm_prefetch::<_MM_HINT_NTA>(next.wrapping_add(128 * i) as *const i8);
                _mm_prefetch::<_MM_HINT_NTA>(next.wrapping_add(128 * i + 64) as *const i8);
                // SAFETY: block i of row r reads w[r·rb + 32i..+32] and a[128i..128i+128], i < n_blocks, r < 4,
                // within the lengths asserted above. Prefetches never fault.
                let ld = |o: usize| unsafe { _mm256_loadu_si256(ap.add(128 * i + o) as *const __m256i) };
                let (a0, a1, a2, a3) = (ld(0), ld(32), ld(64), ld(96));
                for r in 0..4 {
                    let q = unsafe { _mm256_loadu_si256(wp.add(r * rb + 32 * i) as *const __m256i) };
                    let t = _mm256_srli_epi16::<4>(q);
                    // Planes as in the single-row kernel: `& 3` gives planes 1 and 3, `& 12` 4 × planes 0 and 2.
                    let x1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(t, m3), a1),
                        _mm256_maddubs_epi16(_mm256_and_si256(q, m3), a3),
                    );
                    let x4 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(t, m12), a0),
                        _mm256_maddubs_epi16(_mm256_and_si256(q, m12), a2),
                    );
                    p1[r] = _mm256_add_epi16(p1[r], x1);
                    p4[r] = _mm256_add_epi16(p4[r], x4);
                }
                i += 1;
            }
            for r in 0..4 {
                acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(p1[r], ones));
                acc4[r] = _mm256_add_epi32(acc4[r], _mm256_madd_epi16(p4[r], ones));
            }
        }
        let acc: [__m256i; 4] = std::array::from_fn(|r| _mm256_add_epi32(acc1[r], _mm256_srai_epi32::<2>(acc4[r])));
        // One activation row for the four weight rows.
        // SAFETY: the activation row holds k + 8 bytes (asserted above).
        let (s, sum_q) = unsafe { i8_trailers4([ap; 4], k) };
        epi_i2s4(hsum4_i32(acc), s, sum_q, scale)
    }
    fn f(w: &[u8], rb: usize, a: &[u8], k: usize, s: f32) -> [f32; 4] {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { rows4(w, rb, a, k, s) }
    }
    f
}

/// Assembly text for one token's step of [`i2s_clean_tile2x4`]: both rows' code planes (`c0`, `c1`) times the
/// token's activation vector at byte `$off` of its block, each added into that (row, token)'s int16 sums.
macro_rules! i2s_tile_token {
    ($a:literal, $p0:literal, $p1:literal, $off:literal) => {
        concat!(
            "vpmaddubsw {t0}, {c0}, ymmword ptr [{",
            $a,
            "} + ",
            $off,
            "]\n",
            "vpaddw {",
            $p0,
            "}, {",
            $p0,
            "}, {t0}\n",
            "vpmaddubsw {t1}, {c1}, ymmword ptr [{",
            $a,
            "} + ",
            $off,
            "]\n",
            "vpaddw {",
            $p1,
            "}, {",
            $p1,
            "}, {t1}\n",
        )
    };
}

/// One code plane of both rows against all four tokens.
macro_rules! i2s_tile_plane {
    ($off:literal) => {
        concat!(
            i2s_tile_token!("a0", "p00", "p10", $off),
            i2s_tile_token!("a1", "p01", "p11", $off),
            i2s_tile_token!("a2", "p02", "p12", $off),
            i2s_tile_token!("a3", "p03", "p13", $off),
        )
    };
}

/// Clean I2_S, consecutive rows two at a time × four tokens (prompts). Whatever the tiling, 32 multiply-adds cost one maddubs
/// and one int16 add, and Zen 3 issues about four vector operations per cycle, so the block loop's ceiling is near
/// 2.5 operations per maddubs (~50 multiply-adds per cycle; measured 45–52 in an L1-resident loop). A two-row tile
/// shares each code plane's shift and mask across four tokens and the per-call work outside the block loop (setup,
/// int32 widening, epilogue) across two rows. Measured: 6912×2560 × 128 tokens, two threads, medians of 15 alternating
/// in one process, eight runs: 2–7% faster than one row × four tokens. One call covers a run of row pairs (the
/// activation trailers are read once, and results go to the caller's buffer). Each (row, token) integer sum is the
/// exact sum and the epilogue the same IEEE operations, so results equal the scalar reference bit for bit.
pub(crate) fn i2s_clean_tile2x4() -> crate::dot::RowsDot2x4 {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile(w: &[u8], rb: usize, a: [&[u8]; 4], k: usize, scale: f32, out: &mut [[f32; 4]]) {
        let n_rows = out.len();
        assert!(
            n_rows.is_multiple_of(2)
                && k.is_multiple_of(128)
                && rb >= k / 4
                && (n_rows == 0 || w.len() >= (n_rows - 1) * rb + k / 4)
                && a.iter().all(|a| a.len() >= k + 8),
            "I2_S rows or activations too short"
        );
        let ap = a.map(|a| a.as_ptr());
        // SAFETY: each activation row holds k + 8 bytes (asserted above).
        let (s, sum_q) = unsafe { i8_trailers4(ap, k) };
        for (pair, out) in out.chunks_exact_mut(2).enumerate() {
            // SAFETY: rows 2·pair and 2·pair + 1 < n_rows, each k / 4 bytes from its start (asserted above).
            let w0 = unsafe { w.as_ptr().add(2 * pair * rb) };
            let w1 = w0.wrapping_add(rb);
            let acc = unsafe { tile_pair(w0, w1, ap, k) };
            for (out, acc) in out.iter_mut().zip(acc) {
                let sum_cq = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
                *out = epi_i2s4(sum_cq, s, sum_q, scale);
            }
        }
    }
    /// Two rows' (`w0`, `w1`: k / 4 bytes each) exact integer sums against the four tokens (k + 8 bytes each), as
    /// `hadd4_i32`-folded lanes per row. Callers guarantee those lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_pair(w0: *const u8, w1: *const u8, ap: [*const u8; 4], k: usize) -> [__m256i; 2] {
        let ones = _mm256_set1_epi16(1);
        let m3 = _mm256_set1_epi8(3);
        let n_blocks = k / 128;
        // Per row, the four tokens' int32 partial sums folded into one vector (`hadd4_i32`): two accumulators live
        // across the block loop instead of eight, which leaves the loop's registers for the int16 sums.
        let mut acc = [_mm256_setzero_si256(); 2];
        let mut i = 0;
        while i < n_blocks {
            // Up to 8 blocks in int16 per (row, token): 32 maddubs results of at most 2·2·128 = 512, so exact.
            let end = (i + 8).min(n_blocks);
            let mut p = [[_mm256_setzero_si256(); 4]; 2];
            while i < end {
                let [[p00, p01, p02, p03], [p10, p11, p12, p13]] = &mut p;
                // Assembly because LLVM, given the same loop as intrinsics, reassociated the int16 sums and spilled
                // accumulators to the stack in every block. Activation loads fold into the maddubs.
                // SAFETY: block i reads w0/w1[32i..32i+32] and a[j][128i..128i+128], i < n_blocks: within the
                // lengths the caller guarantees. AVX2 loads and register arithmetic only.
                unsafe {
                    std::arch::asm!(
                        "vmovdqu {q0}, ymmword ptr [{w0}]",
                        "vmovdqu {q1}, ymmword ptr [{w1}]",
                        "vpsrlw {c0}, {q0}, 6",
                        "vpsrlw {c1}, {q1}, 6",
                        "vpand {c0}, {c0}, {m3}",
                        "vpand {c1}, {c1}, {m3}",
                        i2s_tile_plane!("0"),
                        "vpsrlw {c0}, {q0}, 4",
                        "vpsrlw {c1}, {q1}, 4",
                        "vpand {c0}, {c0}, {m3}",
                        "vpand {c1}, {c1}, {m3}",
                        i2s_tile_plane!("32"),
                        "vpsrlw {c0}, {q0}, 2",
                        "vpsrlw {c1}, {q1}, 2",
                        "vpand {c0}, {c0}, {m3}",
                        "vpand {c1}, {c1}, {m3}",
                        i2s_tile_plane!("64"),
                        "vpand {c0}, {q0}, {m3}",
                        "vpand {c1}, {q1}, {m3}",
                        i2s_tile_plane!("96"),
                        w0 = in(reg) w0.add(32 * i),
                        w1 = in(reg) w1.add(32 * i),
                        a0 = in(reg) ap[0].add(128 * i),
                        a1 = in(reg) ap[1].add(128 * i),
                        a2 = in(reg) ap[2].add(128 * i),
                        a3 = in(reg) ap[3].add(128 * i),
                        m3 = in(ymm_reg) m3,
                        q0 = out(ymm_reg) _,
                        q1 = out(ymm_reg) _,
                        c0 = out(ymm_reg) _,
                        c1 = out(ymm_reg) _,
                        t0 = out(ymm_reg) _,
                        t1 = out(ymm_reg) _,
                        p00 = inout(ymm_reg) *p00,
                        p01 = inout(ymm_reg) *p01,
                        p02 = inout(ymm_reg) *p02,
                        p03 = inout(ymm_reg) *p03,
                        p10 = inout(ymm_reg) *p10,
                        p11 = inout(ymm_reg) *p11,
                        p12 = inout(ymm_reg) *p12,
                        p13 = inout(ymm_reg) *p13,
                        options(pure, readonly, nostack, preserves_flags)
                    )
                };
                i += 1;
            }
            for (acc, p) in acc.iter_mut().zip(p) {
                *acc = _mm256_add_epi32(*acc, hadd4_i32(p.map(|p| _mm256_madd_epi16(p, ones))));
            }
        }
        acc
    }
    fn f(w: &[u8], rb: usize, a: [&[u8]; 4], k: usize, s: f32, out: &mut [[f32; 4]]) {
        // SAFETY: handed out only for the AVX2 backend, after feature detection.
        unsafe { tile(w, rb, a, k, s, out) }
    }
    f
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i2s_avx2(w: &[u8], a: &[u8], k: usize, scale: f32) -> f32 {
    let mut acc = _mm256_setzero_si256();
    for (i, b) in w[..k / 4].chunks_exact(32).enumerate() {
        acc = _mm256_add_epi32(acc, i2s_block_acc(b, &a[128 * i..]));
    }
    epi_i2s(a, k, hsum_i32(acc), scale)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    let (w, a) = (&w[..4 * k], &a[..4 * k]);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = 4 * (i + 8 * j);
            let wv = _mm256_castsi256_ps(load(&w[o..]));
            let av = _mm256_castsi256_ps(load(&a[o..]));
            *acc = _mm256_fmadd_ps(wv, av, *acc);
        }
        i += 32;
    }
    let mut s = hsum_f32(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for j in i..k {
        s += crate::f32_at(w, 4 * j) * crate::f32_at(a, 4 * j);
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    let (w, a) = (&w[..2 * k], &a[..2 * k]);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = 2 * (i + 8 * j);
            let wv = _mm256_cvtph_ps(load16(&w[o..]));
            let av = _mm256_cvtph_ps(load16(&a[o..]));
            *acc = _mm256_fmadd_ps(wv, av, *acc);
        }
        i += 32;
    }
    let mut s = hsum_f32(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for j in i..k {
        s += f16_at(w, 2 * j) * f16_at(a, 2 * j);
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16w_f32a_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    let (w, a) = (&w[..2 * k], &a[..4 * k]);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    // Four accumulators: an FMA's latency is four cycles, and this dot (the F16 output head) streams 0.66 GB
    // per token on 2B4T, so the chain, not the memory, was the limit with two.
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        _mm_prefetch::<_MM_HINT_NTA>(wp.wrapping_add(2 * i + PREFETCH_BYTES_F16) as *const i8);
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= k, and w, a hold 2k and 4k bytes (sliced above).
            let (wv, av) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * (i + 8 * j)) as *const __m128i)),
                    _mm256_loadu_ps(ap.add(4 * (i + 8 * j)) as *const f32),
                )
            };
            *acc = _mm256_fmadd_ps(wv, av, *acc);
        }
        i += 32;
    }
    while i + 8 <= k {
        let wv = _mm256_cvtph_ps(load16(&w[2 * i..]));
        let av = _mm256_castsi256_ps(load(&a[4 * i..]));
        acc[0] = _mm256_fmadd_ps(wv, av, acc[0]);
        i += 8;
    }
    let mut s = hsum_f32(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for j in i..k {
        s += f16_at(w, 2 * j) * crate::f32_at(a, 4 * j);
    }
    s
}

/// F16 weights × f32 activations. Callers must have checked AVX2, FMA and F16C.
pub(crate) fn f16_f32_row_dot() -> crate::dot::RowDot {
    fn f(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
        // SAFETY: only reachable through `Kernels::f16_with_f32_acts(Backend::Avx2)`, after feature detection.
        unsafe { dot_f16w_f32a_avx2(w, a, k) }
    }
    f
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16_avx2(w: &[u8], a: &[u8], k: usize) -> f32 {
    let (w, a) = (&w[..2 * k], &a[..2 * k]);
    let widen = |v: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= k {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = 2 * (i + 8 * j);
            *acc = _mm256_fmadd_ps(widen(load16(&w[o..])), widen(load16(&a[o..])), *acc);
        }
        i += 16;
    }
    let mut s = hsum_f32(_mm256_add_ps(acc[0], acc[1]));
    let bf = |b: &[u8], i: usize| f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16);
    for j in i..k {
        s += bf(w, j) * bf(a, j);
    }
    s
}

/// One weight row against four activation rows: each 32-weight block is unpacked once and used four times. The four
/// tokens' block sums share one hadd reduction and each lane takes the one-token epilogue's IEEE steps
/// (`(d_w · d_a) · isum`, `+ m_w · s_a` for `MIN` types) in block order, so results are bit-identical to it.
#[inline(always)]
unsafe fn dot4_blocks<const WB: usize, const AB: usize, const AOFF: usize, const SIGNED: bool, const MIN: bool>(
    w: &[u8],
    a: [&[u8]; 4],
    unpack: impl Fn(&[u8]) -> __m256i,
) -> [f32; 4] {
    /// The f16 at byte `o` of each token's activation block, as f32 lanes.
    #[inline(always)]
    fn f16x4(ab: [&[u8]; 4], o: usize) -> __m128 {
        let h = |b: &[u8]| i16::from_le_bytes([b[o], b[o + 1]]);
        // SAFETY: F16C is enabled in every caller (the AVX2 kernels).
        unsafe { _mm_cvtph_ps(_mm_setr_epi16(h(ab[0]), h(ab[1]), h(ab[2]), h(ab[3]), 0, 0, 0, 0)) }
    }
    let mut acc = _mm_setzero_ps();
    for (bi, wb) in w.chunks_exact(WB).enumerate() {
        let x = unpack(wb);
        let ux = if SIGNED { _mm256_sign_epi8(x, x) } else { x };
        let ab = act_blocks4::<AB>(a, bi);
        let mut v = [_mm256_setzero_si256(); 4];
        for (v, ab) in v.iter_mut().zip(ab) {
            let y = load(&ab[AOFF..]);
            *v = mul_sum_us8(ux, if SIGNED { _mm256_sign_epi8(y, x) } else { y });
        }
        let d = _mm_mul_ps(_mm_set1_ps(h16(wb, 0)), f16x4(ab, 0));
        let mut term = _mm_mul_ps(d, _mm_cvtepi32_ps(hsum4_i32(v)));
        if MIN {
            term = _mm_add_ps(term, _mm_mul_ps(_mm_set1_ps(h16(wb, 2)), f16x4(ab, 2)));
        }
        acc = _mm_add_ps(acc, term);
    }
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// Q4_K / Q5_K (`WB`-byte blocks) against four Q8_K activation rows: each block's values are unpacked once for the
/// four tokens; per token, the same block sums and epilogue as the one-token dot, in block order (bit-identical).
#[inline(always)]
unsafe fn k_min_dot4<const WB: usize>(w: &[u8], a: [&[u8]; 4], vals: impl Fn(&[u8]) -> [__m256i; 8]) -> [f32; 4] {
    let mut acc = [0f32; 4];
    for (bi, wb) in w.chunks_exact(WB).enumerate() {
        let v = vals(wb);
        for (acc, a) in acc.iter_mut().zip(a) {
            let ab = &a[bi * 292..(bi + 1) * 292];
            *acc += epi_k_min_with(wb, ab, k_min_sums(v, wb, ab), |b, i| h16(b, i));
        }
    }
    acc
}

/// Block `bi` (`AB` bytes) of each of four activation rows. Written out: `a.map(..)` stayed an out-of-line call per
/// block (tests/hot_kernels.rs caught it).
#[inline(always)]
fn act_blocks4<const AB: usize>(a: [&[u8]; 4], bi: usize) -> [&[u8]; 4] {
    let r = bi * AB..(bi + 1) * AB;
    [&a[0][r.clone()], &a[1][r.clone()], &a[2][r.clone()], &a[3][r]]
}

/// One row of `WB`-byte blocks (f16 scale at `DOFF`) against four Q8_K activation rows (prompts), for the types whose
/// block term is `(d_w · d_a) · isum` (Q6_K, TQ1_0, TQ2_0): `block4` gives the four tokens' integer sums of one block
/// as i32 lanes, unpacking the weights once (most of a ternary or Q6_K block's work). The four sums are reduced
/// together (one hadd tree instead of four horizontal sums) and each lane takes `epi_k`'s IEEE steps, added in block
/// order: the same bits as the one-token dot.
#[inline(always)]
unsafe fn k_quant_dot4<const WB: usize, const DOFF: usize>(
    w: &[u8],
    a: [&[u8]; 4],
    block4: impl Fn(&[u8], [&[u8]; 4]) -> [__m256i; 4],
) -> [f32; 4] {
    let mut acc = _mm_setzero_ps();
    for (bi, wb) in w.chunks_exact(WB).enumerate() {
        let ab = act_blocks4::<292>(a, bi);
        let v = block4(wb, ab);
        let d_a = _mm_setr_ps(f32_at(ab[0], 0), f32_at(ab[1], 0), f32_at(ab[2], 0), f32_at(ab[3], 0));
        let term = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(h16(wb, DOFF)), d_a), _mm_cvtepi32_ps(hsum4_i32(v)));
        acc = _mm_add_ps(acc, term);
    }
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// The four sums of one TQ block: trits unpacked once, then [`tq_q8k_block`] per token.
#[inline(always)]
unsafe fn tq_q8k_block4(trits: [__m256i; 8], ab: [&[u8]; 4]) -> [__m256i; 4] {
    // A plain loop, not `std::array::from_fn` (see `k_quant_rows4`).
    let mut v = [_mm256_setzero_si256(); 4];
    for (v, ab) in v.iter_mut().zip(ab) {
        *v = tq_q8k_block(trits, ab);
    }
    v
}

/// A four-token row dot (see [`dot4_blocks`]); `None` for types that fall back to four single dots.
pub(crate) fn row_dot4(ty: GgmlType) -> Option<crate::dot::RowDot4> {
    use GgmlType::*;
    // Each kernel is a target-feature function (so the block helpers inline into it) behind a plain `RowDot4`.
    macro_rules! dot4 {
        (|$w:ident, $a:ident| $e:expr) => {{
            fn f(w: &[u8], a: [&[u8]; 4], _k: usize, _s: f32) -> [f32; 4] {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn inner($w: &[u8], $a: [&[u8]; 4]) -> [f32; 4] {
                    $e
                }
                // SAFETY: only reachable through `Kernels::new(.., Backend::Avx2)`, chosen after feature detection.
                unsafe { inner(w, a) }
            }
            f as crate::dot::RowDot4
        }};
    }
    macro_rules! four {
        ($wb:expr, $ab:expr, $aoff:expr, $signed:expr, $min:expr, $vals:ident) => {
            dot4!(|w, a| dot4_blocks::<$wb, $ab, $aoff, $signed, $min>(w, a, |b| $vals(b)))
        };
    }
    Some(match ty {
        Q4_0 => four!(18, 34, 2, true, false, q4_0_vals),
        Q8_0 => four!(34, 34, 2, true, false, q8_0_vals),
        Q5_0 => four!(22, 34, 2, true, false, q5_0_vals),
        Q4_1 => four!(20, 36, 4, false, true, q4_1_vals),
        Q5_1 => four!(24, 36, 4, false, true, q5_1_vals),
        Q4_K => dot4!(|w, a| k_min_dot4::<144>(w, a, |b| q4_k_vals(b))),
        Q5_K => dot4!(|w, a| k_min_dot4::<176>(w, a, |b| q5_k_vals(b))),
        // SAFETY (closure): the driver hands over a whole 210-byte block and four whole 292-byte blocks.
        Q6_K => dot4!(|w, a| k_quant_dot4::<210, 208>(w, a, |wb, ab| unsafe {
            q6_k_block_n::<4>(wb.as_ptr(), [ab[0].as_ptr(), ab[1].as_ptr(), ab[2].as_ptr(), ab[3].as_ptr()])
        })),
        TQ1_0 => dot4!(|w, a| k_quant_dot4::<54, 52>(w, a, |wb, ab| tq_q8k_block4(tq1_0_trit_vecs(wb), ab))),
        TQ2_0 => dot4!(|w, a| k_quant_dot4::<66, 64>(w, a, |wb, ab| tq_q8k_block4(tq2_0_trit_vecs(wb), ab))),
        _ => return None,
    })
}

/// The AVX2 row dot for `ty`; `None` for types without one. Callers must have checked AVX2, FMA and F16C.
pub(crate) fn row_dot(ty: GgmlType) -> Option<crate::dot::RowDot> {
    use GgmlType::*;
    macro_rules! blocks {
        ($wb:expr, $ab:expr, |$x:ident, $y:ident| $e:expr) => {{
            fn f(w: &[u8], a: &[u8], _k: usize, _s: f32) -> f32 {
                // The loop lives in a target-feature function so the block kernel inlines into it.
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn inner(w: &[u8], a: &[u8]) -> f32 {
                    let mut acc = 0f32;
                    for ($x, $y) in w.chunks_exact($wb).zip(a.chunks_exact($ab)) {
                        acc += $e;
                    }
                    acc
                }
                // SAFETY: this function is only reachable through `Kernels::new(.., Backend::Avx2)`, after the CPU features were
                // detected.
                unsafe { inner(w, a) }
            }
            f as crate::dot::RowDot
        }};
    }
    macro_rules! blocks8 {
        ($wb:expr, $ab:expr, $aoff:expr, $signed:expr, $min:expr, $vals:ident) => {{
            fn f(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn inner(w: &[u8], a: &[u8], k: usize) -> f32 {
                    dot_blocks8::<$wb, $ab, $aoff, $signed, $min>(w, a, k, |w| $vals(w))
                }
                // SAFETY: only reachable after feature detection (see above).
                unsafe { inner(w, a, k) }
            }
            f as crate::dot::RowDot
        }};
    }
    macro_rules! whole {
        ($f:expr) => {{
            fn f(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
                // SAFETY: only reachable after feature detection (see above).
                unsafe { $f(w, a, k, s) }
            }
            f as crate::dot::RowDot
        }};
    }
    Some(match ty {
        F32 => whole!(|w, a, k, _s| dot_f32_avx2(w, a, k)),
        F16 => whole!(|w, a, k, _s| dot_f16_avx2(w, a, k)),
        BF16 => whole!(|w, a, k, _s| dot_bf16_avx2(w, a, k)),
        Q4_0 => blocks8!(18, 34, 2, true, false, q4_0_vals),
        Q5_0 => blocks8!(22, 34, 2, true, false, q5_0_vals),
        Q8_0 => whole!(|w, a, k, _s| dot_q8_0_avx2(w, a, k)),
        Q4_1 => blocks8!(20, 36, 4, false, true, q4_1_vals),
        Q5_1 => blocks8!(24, 36, 4, false, true, q5_1_vals),
        Q4_K => blocks!(144, 292, |x, y| epi_k_min_with(x, y, k_min_sums(q4_k_vals(x), x, y), |b, i| h16(b, i))),
        Q5_K => blocks!(176, 292, |x, y| epi_k_min_with(x, y, k_min_sums(q5_k_vals(x), x, y), |b, i| h16(b, i))),
        Q6_K => whole!(|w, a, k, _s| dot_q6_k_avx2(w, a, k)),
        TQ1_0 => whole!(|w, a, k, _s| dot_tq1_0_avx2(w, a, k)),
        TQ2_0 => whole!(|w, a, k, _s| dot_tq2_0_avx2(w, a, k)),
        I2_S => whole!(dot_i2s_avx2),
        _ => return None,
    })
}

/// Per-block integer kernels, exposed for the scalar-equality tests.
#[doc(hidden)]
pub(crate) fn block_isum(ty: GgmlType) -> Option<crate::dot::BlockIsum> {
    use GgmlType::*;
    macro_rules! one {
        ($f:ident) => {{
            fn g(w: &[u8], a: &[u8]) -> (i32, i32) {
                // SAFETY: only called by tests after feature detection.
                (unsafe { $f(w, a) }, 0)
            }
            g as crate::dot::BlockIsum
        }};
    }
    macro_rules! two {
        ($f:ident) => {{
            fn g(w: &[u8], a: &[u8]) -> (i32, i32) {
                // SAFETY: only called by tests after feature detection.
                unsafe { $f(w, a) }
            }
            g as crate::dot::BlockIsum
        }};
    }
    Some(match ty {
        Q4_0 => one!(isum_q4_0_avx2),
        Q4_1 => one!(isum_q4_1_avx2),
        Q5_0 => one!(isum_q5_0_avx2),
        Q5_1 => one!(isum_q5_1_avx2),
        Q8_0 => one!(isum_q8_0_avx2),
        Q4_K => two!(isum_q4_k_avx2),
        Q5_K => two!(isum_q5_k_avx2),
        Q6_K => one!(isum_q6_k_avx2),
        TQ1_0 => one!(isum_tq1_0_avx2),
        TQ2_0 => one!(isum_tq2_0_avx2),
        I2_S => one!(isum_i2s_avx2),
        _ => return None,
    })
}

/// Wrapping sum of `s` with 128-byte steps of four independent vector adds (see `crate::sum_u64`).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn sum_u64_avx2(s: &[u64]) -> u64 {
    let p = s.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i + 16 <= s.len() {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: elements i + 4j .. i + 4j + 4 lie below i + 16 <= len.
            *acc = _mm256_add_epi64(*acc, unsafe { _mm256_loadu_si256(p.add(i + 4 * j) as *const __m256i) });
        }
        i += 16;
    }
    let v = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` holds 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
    lanes.iter().chain(&s[i..]).fold(0u64, |a, &b| a.wrapping_add(b))
}
