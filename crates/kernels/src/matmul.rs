//! A weight matrix in any supported format times a batch of activation rows, split across a [`ThreadPool`].

use crate::dot::{Backend, Kernels};
use crate::{scalar, ActType, Disjoint, GgmlType, QuantizedActs, ThreadPool, UnsupportedType};
use std::sync::Arc;

/// Bytes of a weight tensor: a window into a shared buffer (usually a memory-mapped GGUF file) or an owned copy.
#[derive(Clone)]
pub struct WeightBytes {
    src: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl WeightBytes {
    /// A window `start..start+len` of `src`; panics if it is out of bounds (callers validate against the file).
    pub fn window(src: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Self {
        assert!(start.checked_add(len).is_some_and(|e| e <= (*src).as_ref().len()), "weight window out of bounds");
        WeightBytes { src, start, len }
    }
    pub fn owned(v: Vec<u8>) -> Self {
        let len = v.len();
        WeightBytes { src: Arc::new(v), start: 0, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &(*self.src).as_ref()[self.start..self.start + self.len]
    }
}

/// An M×K weight matrix (M rows of K weights, ggml dims `[K, M]`) in one GGML type.
#[derive(Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Per-tensor scale (I2_S only; 1.0 otherwise).
    pub scale: f32,
    /// Row length the kernels see: `cols`, or for I2_S rows that are not whole blocks, `cols` rounded up to 128
    /// (the weights were repacked with zero padding; activations are padded with zeros per call).
    kcols: usize,
    row_bytes: usize,
    data: WeightBytes,
    kernels: Kernels,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} {}x{})", self.kernels.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    pub fn new(ty: GgmlType, data: WeightBytes, rows: usize, cols: usize) -> Result<QMatrix, String> {
        Self::with_backend(ty, data, rows, cols, Backend::detect())
    }

    pub fn with_backend(
        ty: GgmlType,
        data: WeightBytes,
        rows: usize,
        cols: usize,
        backend: Backend,
    ) -> Result<QMatrix, String> {
        // Mutated only where x86 kernels are swapped in below.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels = Kernels::new(ty, backend).map_err(|e: UnsupportedType| e.to_string())?;
        let block = ty.block_size().max(kernels.act.block());
        let ragged_i2s = ty == GgmlType::I2_S && !cols.is_multiple_of(block);
        if !cols.is_multiple_of(block) && !ragged_i2s {
            return Err(format!(
                "{ty} matrix with rows of {cols} weights: the row length must be a multiple of {block}"
            ));
        }
        let expected = ty.tensor_bytes(cols as u64, (rows * cols) as u64).unwrap_or(u64::MAX);
        if data.as_slice().len() as u64 != expected {
            return Err(format!("{ty} matrix {rows}x{cols} needs {expected} bytes, got {}", data.as_slice().len()));
        }
        let scale = if ty == GgmlType::I2_S { scalar::i2s_tensor_scale(data.as_slice()) } else { 1.0 };
        let (data, kcols) = if ragged_i2s {
            let kcols = cols.div_ceil(128) * 128;
            (WeightBytes::owned(scalar::i2s_pad_rows(data.as_slice(), rows, cols, kcols)), kcols)
        } else {
            (data, cols)
        };
        #[cfg(target_arch = "x86_64")]
        if ty == GgmlType::I2_S && backend == Backend::Avx2 {
            // Real files never use code 3; one scan at load lets the kernels skip the per-block fix-up.
            let body = &data.as_slice()[..rows * kcols / 4];
            if !scalar::i2s_has_code3(body) {
                let (dot, dot4) = crate::avx2::i2s_clean_kernels();
                // VNNI where the CPU has it (one instruction per 32 multiply-adds instead of maddubs + add). All exact.
                kernels.dot = crate::vnni::x86::i2s_row_dot().unwrap_or(dot);
                kernels.dot4 = Some(crate::vnni::x86::i2s_row_dot4().unwrap_or(dot4));
                // Without VNNI, decode takes four rows per call (VNNI's single-row kernel is kept where it exists:
                // it has not been timed against a four-row one).
                if crate::vnni::x86::i2s_row_dot().is_none() {
                    kernels.rows4 = Some(crate::avx2::i2s_clean_rows4());
                    kernels.tile2x4 = Some(crate::avx2::i2s_clean_tile2x4());
                }
            }
        }
        let row_bytes = ty.row_bytes(kcols);
        Ok(QMatrix { rows, cols, scale, kcols, row_bytes, data, kernels })
    }

    /// For TQ1_0 / TQ2_0: use BitNet's per-token int8 activations instead of per-block Q8_K.
    pub fn use_per_token_acts(&mut self) {
        if let Ok(k) = Kernels::tq_per_token(self.ty(), self.kernels.backend) {
            self.kernels = k;
        }
    }

    /// For F16 weights: dot with f32 activations instead of converting them to f16 (bitnet.cpp's arithmetic).
    pub fn use_f32_activations(&mut self) {
        if self.ty() == GgmlType::F16 {
            self.kernels = Kernels::f16_with_f32_acts(self.kernels.backend);
        }
    }

    pub fn ty(&self) -> GgmlType {
        self.kernels.ty
    }
    pub fn act_type(&self) -> ActType {
        self.kernels.act
    }
    pub fn backend(&self) -> Backend {
        self.kernels.backend
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// All the matrix's bytes (rows, then for I2_S the tensor's scale tail), as the kernels read them.
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes;
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` into `out` (length `cols`), e.g. for embedding lookups.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kcols != self.cols {
            let mut padded = vec![0f32; self.kcols];
            scalar::dequantize_row(self.ty(), self.row(r), &mut padded, self.scale)
                .expect("type checked at construction");
            out.copy_from_slice(&padded[..self.cols]);
            return;
        }
        scalar::dequantize_row(self.ty(), self.row(r), out, self.scale).expect("type checked at construction");
    }

    /// `out[t * rows + r] = W[r] · x[t]` for every activation row t. `x` must be in [`QMatrix::act_type`].
    pub fn matmul(&self, x: &QuantizedActs, out: &mut [f32], pool: &ThreadPool) {
        QMatrix::matmul_group(&mut [(self, out)], x, pool);
    }

    /// Several matrices times the same activations (Q/K/V, gate/up) as one pool job: one synchronisation
    /// instead of one per matrix, and in decode each thread streams long runs across the matrices. Results equal
    /// separate [`QMatrix::matmul`] calls bit for bit (each output is the same row dot).
    pub fn matmul_group(parts: &mut [(&QMatrix, &mut [f32])], x: &QuantizedActs, pool: &ThreadPool) {
        for (m, out) in parts.iter() {
            assert_eq!(x.ty, m.act_type(), "activations quantized for the wrong weight type");
            assert_eq!(x.k, m.cols, "activation length does not match the matrix");
            assert_eq!(out.len(), x.n_rows * m.rows, "output buffer size");
        }
        // Matrices whose rows were padded to whole I2_S blocks read activations padded the same way.
        let padded: Vec<Option<QuantizedActs>> =
            parts.iter().map(|(m, _)| (m.kcols != m.cols).then(|| m.pad_acts(x))).collect();
        let n_tok = x.n_rows;
        let total_rows: usize = parts.iter().map(|(m, _)| m.rows).sum();
        if total_rows == 0 || n_tok == 0 {
            return;
        }
        // Decode streams the weights from DRAM: the pool hands each thread a contiguous range of tasks, so each
        // streams one long run of rows, which the hardware prefetchers follow (16-row tasks dealt alternately to
        // the threads read at 16 GB/s where contiguous runs read at 24 on this 2-core EPYC); 16 tasks per thread
        // let the one that finishes first take over the other's last ones. Batches keep a task's weight rows hot
        // while walking every token, so each task reads all the tokens' activations once: long prompts (the
        // decoder's 128-token micro-batches carry ~330 KB of activations, most of L2) take 64 rows per task to read
        // them a quarter as often per multiply-add, small batches 8 for balance. I2_S 6912×2560, 2 threads, medians
        // of 12 alternating in one process: 512 tokens 133–137 → 143–149 GMAC/s, 128 tokens +2–5%; 16 tokens 8%
        // slower with 64 rows.
        let rows_per_task = match n_tok {
            1 => total_rows.div_ceil(16 * pool.n_threads()).next_multiple_of(16),
            2..64 => 8,
            _ => 64,
        };
        // Task t covers global rows [t*rpt, (t+1)*rpt), which may span the end of one matrix and the start of the
        // next; `starts[i]` is matrix i's first global row.
        let mut starts = Vec::with_capacity(parts.len());
        let mut acc = 0;
        for (m, _) in parts.iter() {
            starts.push(acc);
            acc += m.rows;
        }
        let dsts: Vec<(&QMatrix, &QuantizedActs, Disjoint<f32>)> = parts
            .iter_mut()
            .zip(&padded)
            .map(|((m, out), p)| (*m, p.as_ref().unwrap_or(x), Disjoint::new(out)))
            .collect();
        let n_tasks = total_rows.div_ceil(rows_per_task);
        let task = |t: usize| {
            let (g0, g1) = (t * rows_per_task, ((t + 1) * rows_per_task).min(total_rows));
            for ((m, x, dst), &s) in dsts.iter().zip(&starts) {
                let (r0, r1) = (g0.max(s) - s, g1.min(s + m.rows).saturating_sub(s));
                if r0 < r1 {
                    m.rows_times(x, dst, r0, r1);
                }
            }
        };
        pool.run(n_tasks, &task);
    }

    /// Rows `r0..r1` of `W · x[t]` for every token, written into `dst` (laid out `[t * rows + r]`).
    fn rows_times(&self, x: &QuantizedActs, dst: &Disjoint<f32>, r0: usize, r1: usize) {
        let (w_all, rb, n_tok) = (self.data.as_slice(), self.row_bytes, x.n_rows);
        let mut tok = 0;
        if let Some(dot4) = self.kernels.dot4 {
            while tok + 4 <= n_tok {
                let a = [x.row(tok), x.row(tok + 1), x.row(tok + 2), x.row(tok + 3)];
                let mut r = r0;
                if let Some(tile) = self.kernels.tile2x4 {
                    // Up to 64 rows per call: the per-call work (activation trailers, setup) is shared, and results
                    // land in a buffer read after the call instead of values read back right after each pair's
                    // division (which showed as ~8% of prompt time in the loop around a per-pair kernel).
                    let mut buf = [[0f32; 4]; 64];
                    while r + 2 <= r1 {
                        let n = ((r1 - r) & !1).min(buf.len());
                        tile(&w_all[r * rb..(r + n) * rb], rb, a, self.kcols, self.scale, &mut buf[..n]);
                        for j in 0..4 {
                            for (i, v) in buf[..n].iter().enumerate() {
                                // SAFETY: index < n_tok * rows == the output's length (checked by the caller);
                                // rows r0..r1 of this matrix belong to the calling task only.
                                unsafe { dst.write((tok + j) * self.rows + r + i, v[j]) };
                            }
                        }
                        r += n;
                    }
                }
                for r in r..r1 {
                    let v = dot4(&w_all[r * rb..(r + 1) * rb], a, self.kcols, self.scale);
                    for (j, v) in v.into_iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { dst.write((tok + j) * self.rows + r, v) };
                    }
                }
                tok += 4;
            }
        }
        for tok in tok..n_tok {
            let a = x.row(tok);
            let mut r = r0;
            if let Some(rows4) = self.kernels.rows4 {
                while r + 4 <= r1 {
                    let v = rows4(&w_all[r * rb..(r + 4) * rb], rb, a, self.kcols, self.scale);
                    for (j, v) in v.into_iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { dst.write(tok * self.rows + r + j, v) };
                    }
                    r += 4;
                }
            }
            for r in r..r1 {
                let v = (self.kernels.dot)(&w_all[r * rb..(r + 1) * rb], a, self.kcols, self.scale);
                // SAFETY: as above.
                unsafe { dst.write(tok * self.rows + r, v) };
            }
        }
    }

    /// Activations for a matrix whose rows were padded to whole I2_S blocks, padded the same way. Per-token int8
    /// rows are [k values][scale f32][sum i32]: zeros appended to the values change neither the dot nor the sum.
    fn pad_acts(&self, x: &QuantizedActs) -> QuantizedActs {
        let (k, kp) = (self.cols, self.kcols);
        let mut data = vec![0u8; x.n_rows * (kp + 8)];
        for t in 0..x.n_rows {
            let (src, dst) = (x.row(t), &mut data[t * (kp + 8)..(t + 1) * (kp + 8)]);
            dst[..k].copy_from_slice(&src[..k]);
            dst[kp..].copy_from_slice(&src[k..k + 8]);
        }
        QuantizedActs { ty: x.ty, k: kp, n_rows: x.n_rows, data }
    }

    /// Quantizes `x` (rows of `cols`) for this matrix and multiplies.
    pub fn matmul_f32(&self, x: &[f32], out: &mut [f32], pool: &ThreadPool) {
        let q = QuantizedActs::quantize(self.act_type(), x, self.cols);
        self.matmul(&q, out, pool);
    }
}
