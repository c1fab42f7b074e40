//! The one decoder: embedding → N × (RMSNorm → attention → [SubLN] → residual → RMSNorm → gated FFN → [SubLN] →
//! residual) → RMSNorm → head. Architecture differences (RoPE style, QKV biases, QK-norm, sub-norms, FFN activation,
//! tied head) are flags in [`ModelConfig`] or the presence of optional tensors, never separate model code.
//!
//! `forward` takes a batch of tokens from any number of sequences, each with its own KV-cache slot: the prompt
//! path turns into matrix-matrix products and a server can batch many users' decode steps into one pass.

use crate::config::{AttentionNumerics, FfnActivation, ModelConfig, RopeStyle};
use crate::kv::KvCache;
use crate::ops;
use anyhow::{bail, Context, Result};
use half::f16;
use std::path::Path;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_kernels::attn::{dot_f16_f32, mad_f16, scale_f16, scores_f16, weighted_sum_f16};
use ternlm_kernels::dot::Backend;
use ternlm_kernels::matmul::WeightBytes;
use ternlm_kernels::{ActType, Disjoint, QMatrix, QuantizedActs, ThreadPool};

/// Tokens per forward pass inside [`Model::forward`]; longer batches are split.
const MICRO_BATCH: usize = 128;

/// A linear layer in any weight format (the format is the matrix's business), with an optional bias.
pub struct Linear {
    pub w: QMatrix,
    pub bias: Option<Vec<f32>>,
    /// Optional per-tensor output scale (`<name>.scale`, as in 1bitLLM `bitnet` files), applied before the bias.
    pub scale: Option<f32>,
    /// Optional RMSNorm of the input (`<name>_in_norm.weight`, with the model's epsilon): BitDistill's "allnorm"
    /// SubLN variant puts one before every quantized projection.
    pub in_norm: Option<(Vec<f32>, f32)>,
}

impl Linear {
    pub fn out_dim(&self) -> usize {
        self.w.rows
    }

    /// `out[t] = W·x[t] (+ b)` for `n` rows of `x`, reusing `q` when it already holds `x` in this layer's format.
    fn forward(&self, x: &[f32], q: &mut Option<QuantizedActs>, out: &mut [f32], pool: &ThreadPool) {
        let act = self.w.act_type();
        if let Some((w, eps)) = &self.in_norm {
            // This layer's own normalised input: neither reuses nor leaves behind the shared quantized rows.
            let mut xn = vec![0f32; x.len()];
            for (src, dst) in x.chunks_exact(self.w.cols).zip(xn.chunks_exact_mut(self.w.cols)) {
                ops::rms_norm(src, w, *eps, dst);
            }
            self.w.matmul(&quantize_parallel(act, &xn, self.w.cols, pool), out, pool);
        } else {
            if q.as_ref().is_none_or(|q| q.ty != act) {
                *q = Some(quantize_parallel(act, x, self.w.cols, pool));
            }
            self.w.matmul(q.as_ref().expect("set above"), out, pool);
        }
        self.scale_and_bias(out);
    }

    /// The output scale, then the bias, applied to `out` (rows of `out_dim`) after the matmul.
    fn scale_and_bias(&self, out: &mut [f32]) {
        if let Some(s) = self.scale {
            out.iter_mut().for_each(|o| *o *= s);
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
    }
}

/// Linear layers that read the same input (Q/K/V, gate/up): one grouped matmul when they share an activation
/// format and none normalises its own input, else one after another. Results are the same either way.
fn forward_group(lins: &[&Linear], x: &[f32], outs: &mut [&mut [f32]], pool: &ThreadPool) {
    let act = lins[0].w.act_type();
    let groupable = lins.iter().all(|l| l.in_norm.is_none() && l.w.act_type() == act && l.w.cols == lins[0].w.cols);
    if !groupable {
        let mut q = None;
        for (l, out) in lins.iter().zip(outs.iter_mut()) {
            l.forward(x, &mut q, out, pool);
        }
        return;
    }
    let q = quantize_parallel(act, x, lins[0].w.cols, pool);
    let mut parts: Vec<(&QMatrix, &mut [f32])> =
        lins.iter().zip(outs.iter_mut()).map(|(l, o)| (&l.w, &mut **o)).collect();
    QMatrix::matmul_group(&mut parts, &q, pool);
    for (l, out) in lins.iter().zip(outs.iter_mut()) {
        l.scale_and_bias(out);
    }
}

/// `f(t, row)` for each token's row of `buf` (rows of `len`): on the pool for prompt-sized batches, where these
/// per-token steps (activation quantization, norms with their sequential f64 sums, RoPE, the FFN gate) otherwise
/// leave the other threads idle. Each row is computed exactly as it would be serially.
fn per_token<T: Send>(pool: &ThreadPool, buf: &mut [T], len: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    let n = buf.len() / len;
    if n < 8 {
        buf.chunks_exact_mut(len).enumerate().for_each(|(t, row)| f(t, row));
        return;
    }
    let rows = Disjoint::new(buf);
    pool.run(n, &|t| {
        // SAFETY: task t is the only one touching row t.
        f(t, unsafe { rows.slice(t * len, len) })
    });
}

fn quantize_parallel(act: ActType, x: &[f32], k: usize, pool: &ThreadPool) -> QuantizedActs {
    let (n, rb) = (x.len() / k, act.row_bytes(k));
    let mut data = vec![0u8; rb * n];
    per_token(pool, &mut data, rb, &|t, dst| ternlm_kernels::act::quantize_row(act, &x[t * k..(t + 1) * k], dst));
    QuantizedActs { ty: act, k, n_rows: n, data }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    attn_sub_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    ffn_sub_norm: Option<Vec<f32>>,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub file: Arc<GgufFile>,
    tok_embd: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: the head is the token embedding.
    output: Option<QMatrix>,
    /// The embedding's file pages were handed back (a tied head re-quantized by `--head-type`): its rows are read
    /// from the file, not the mapping, so lookups do not bring the old head back into memory.
    embd_released: bool,
    rope_freqs: Option<Vec<f32>>,
}

/// One token of a batch: its id, its position in its sequence, the sequence's KV slot, and whether to return
/// its logits.
#[derive(Clone, Copy, Debug)]
pub struct BatchToken {
    pub token: u32,
    pub pos: usize,
    pub seq: usize,
    pub logits: bool,
}

struct Loader<'a> {
    f: &'a Arc<GgufFile>,
    rms_eps: f32,
    backend: Backend,
    f32_acts_for_f16: bool,
}

impl Loader<'_> {
    fn path(&self) -> String {
        self.f.path().display().to_string()
    }

    fn has(&self, name: &str) -> bool {
        self.f.tensor_info(name).is_some()
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.f.tensor_info(name).with_context(|| format!("{}: missing tensor '{name}'", self.path()))?;
        if t.n_elements() != len as u64 {
            bail!("{}: tensor '{name}' has shape {:?}, expected [{len}]", self.path(), t.dims);
        }
        let mut out = vec![0f32; len];
        ternlm_kernels::scalar::dequantize_row(t.ty, self.f.tensor_data(t), &mut out, 1.0)
            .map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", self.path()))?;
        Ok(out)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<QMatrix> {
        let t = self.f.tensor_info(name).with_context(|| format!("{}: missing tensor '{name}'", self.path()))?;
        if t.dims.len() != 2 || t.dims[0] != cols as u64 || t.dims[1] != rows as u64 {
            bail!("{}: tensor '{name}' has shape {:?}, expected [{cols}, {rows}]", self.path(), t.dims);
        }
        let start = (self.f.data_offset + t.offset) as usize;
        let src: Arc<dyn AsRef<[u8]> + Send + Sync> = self.f.clone();
        let bytes = WeightBytes::window(src, start, t.size as usize);
        let mut m = QMatrix::with_backend(t.ty, bytes, rows, cols, self.backend)
            .map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", self.path()))?;
        if self.f32_acts_for_f16 {
            m.use_f32_activations();
        }
        Ok(m)
    }

    fn linear(&self, name: &str, cols: usize, rows: usize) -> Result<Linear> {
        let w = self.matrix(&format!("{name}.weight"), cols, rows)?;
        let bias = self.opt_vector(&format!("{name}.bias"), rows)?;
        let scale = self.opt_vector(&format!("{name}.scale"), 1)?.map(|v| v[0]);
        let in_norm = self.opt_vector(&format!("{name}_in_norm.weight"), cols)?.map(|w| (w, self.rms_eps));
        Ok(Linear { w, bias, scale, in_norm })
    }
}

impl Model {
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let f = Arc::new(GgufFile::open(path.as_ref())?);
        Self::from_gguf(f)
    }

    pub fn from_gguf(f: Arc<GgufFile>) -> Result<Model> {
        Self::from_gguf_with_backend(f, Backend::detect())
    }

    /// Loads with a chosen kernel backend (the scalar reference, e.g., to check the SIMD paths on a real model).
    pub fn from_gguf_with_backend(f: Arc<GgufFile>, backend: Backend) -> Result<Model> {
        let cfg = ModelConfig::from_gguf(&f)?;
        let l = Loader { f: &f, rms_eps: cfg.rms_eps, backend, f32_acts_for_f16: cfg.f16_weights_f32_acts };
        let (d, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let tok_embd = l.matrix("token_embd.weight", d, cfg.n_vocab)?;
        // No capacity from the file's block_count: a hostile value must fail on the first missing tensor, not allocate.
        let mut layers = Vec::new();
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let sub = |s: &str| -> Result<Option<Vec<f32>>> {
                let name = p(s);
                let len = if s.starts_with("attn") { qd } else { ff };
                if cfg.sub_norms {
                    l.vector(&name, len).map(Some)
                } else {
                    l.opt_vector(&name, len)
                }
            };
            layers.push(Layer {
                attn_norm: l.vector(&p("attn_norm.weight"), d)?,
                wq: l.linear(&p("attn_q"), d, qd)?,
                wk: l.linear(&p("attn_k"), d, kvd)?,
                wv: l.linear(&p("attn_v"), d, kvd)?,
                wo: l.linear(&p("attn_output"), qd, d)?,
                q_norm: l.opt_vector(&p("attn_q_norm.weight"), cfg.head_dim)?,
                k_norm: l.opt_vector(&p("attn_k_norm.weight"), cfg.head_dim)?,
                attn_sub_norm: sub("attn_sub_norm.weight")?,
                ffn_norm: l.vector(&p("ffn_norm.weight"), d)?,
                w_gate: l.linear(&p("ffn_gate"), d, ff)?,
                w_up: l.linear(&p("ffn_up"), d, ff)?,
                w_down: l.linear(&p("ffn_down"), ff, d)?,
                ffn_sub_norm: sub("ffn_sub_norm.weight")?,
            });
        }
        let output_norm = l.vector("output_norm.weight", d)?;
        let output = if !cfg.force_tied_head && l.has("output.weight") {
            Some(l.matrix("output.weight", d, cfg.n_vocab)?)
        } else {
            None
        };
        let rope_freqs = l.opt_vector("rope_freqs.weight", cfg.rope_dim / 2)?;
        Ok(Model { cfg, file: f, tok_embd, layers, output_norm, output, rope_freqs, embd_released: false })
    }

    /// Switches TQ1_0 / TQ2_0 projections to BitNet's per-token int8 activations (the semantics the model was
    /// trained with, and the one I2_S uses). The default is llama.cpp's per-256-block Q8_K, which llama.cpp and
    /// bitnet.cpp compute for TQ files, so that outputs agree with theirs.
    pub fn use_per_token_tq_acts(&mut self) {
        for l in &mut self.layers {
            for lin in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                lin.w.use_per_token_acts();
            }
        }
    }

    /// Re-quantizes the output head in memory (e.g. an F16 head to Q8_0: half the bytes read per token, which is
    /// the largest single lever on generation speed for BitNet 2B4T). The token embedding used for lookups is left
    /// as it is in the file.
    pub fn requantize_head(&mut self, ty: GgmlType, pool: &ThreadPool) -> Result<()> {
        if !matches!(ty, GgmlType::Q8_0 | GgmlType::Q6_K | GgmlType::F16) {
            bail!("head type {ty} is not supported (q8_0, q6_k or f16)");
        }
        let head = self.head();
        if head.ty() == ty {
            return Ok(());
        }
        let (rows, cols) = (head.rows, head.cols);
        if !cols.is_multiple_of(ty.block_size()) {
            bail!(
                "head type {ty} needs rows that are a multiple of {} values; this model's output head has {cols} \
                 columns (use q8_0)",
                ty.block_size()
            );
        }
        let bytes = ty.row_bytes(cols);
        let mut data = vec![0u8; rows * bytes];
        let dst = Disjoint::new(&mut data);
        let chunk = 256;
        pool.run(rows.div_ceil(chunk), &|c| {
            let mut row = vec![0f32; cols];
            for r in c * chunk..((c + 1) * chunk).min(rows) {
                head.dequantize_row(r, &mut row);
                let q: Vec<u8> = match ty {
                    GgmlType::Q8_0 => ternlm_kernels::quant::quantize_q8_0(&row),
                    GgmlType::Q6_K => ternlm_kernels::quant::quantize_q6_k(&row),
                    _ => row.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
                };
                // SAFETY: task c writes only rows c*chunk..(c+1)*chunk.
                unsafe { dst.slice(r * bytes, bytes) }.copy_from_slice(&q);
            }
            // Converted rows leave the resident set at once, so the old and the new head never coexist in memory
            // (only embedding lookups, one row per token for a tied head, read them from now on).
            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(rows));
            let rb = head.row_bytes();
            self.file.release_pages(&head.bytes()[r0 * rb..r1 * rb]);
        });
        // (I2_S rows may be padded in memory; such an embedding keeps the mapped path.)
        self.embd_released |= self.output.is_none() && self.tok_embd.ty() != GgmlType::I2_S;
        self.output = Some(
            QMatrix::new(ty, WeightBytes::owned(data), rows, cols).map_err(|e| anyhow::anyhow!("output head: {e}"))?,
        );
        Ok(())
    }

    fn embed(&self, token: usize, out: &mut [f32]) {
        if !self.embd_released {
            return self.tok_embd.dequantize_row(token, out);
        }
        let row = self.tok_embd.row(token);
        let mut bytes = vec![0u8; row.len()];
        self.file.read_unmapped(row, &mut bytes);
        ternlm_kernels::scalar::dequantize_row(self.tok_embd.ty(), &bytes, out, self.tok_embd.scale)
            .expect("type checked at load");
    }

    pub fn head(&self) -> &QMatrix {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    /// Weight bytes read to generate one token: every block tensor once, the head (as loaded) once, and one row
    /// of the token embedding.
    pub fn weight_bytes_per_token(&self) -> u64 {
        let head = self.head();
        let head_bytes = (head.rows * head.row_bytes()) as u64;
        let body: u64 = self
            .file
            .tensors()
            .iter()
            .filter(|t| t.name != "token_embd.weight" && t.name != "output.weight")
            .map(|t| t.size)
            .sum();
        let embd_row = self.tok_embd.row_bytes() as u64;
        body + head_bytes + embd_row
    }

    pub fn new_kv_cache(&self, n_ctx: usize, n_seq: usize) -> KvCache {
        KvCache::new(self.cfg.n_layer, self.cfg.kv_dim(), n_ctx, n_seq)
    }

    /// Runs a batch through the model, appending its keys/values to each sequence's slot. Returns the logits of
    /// the tokens marked `logits`, in batch order (`n_vocab` each).
    pub fn forward(&self, batch: &[BatchToken], kv: &mut KvCache, pool: &ThreadPool) -> Result<Vec<f32>> {
        self.check_batch(batch, kv)?;
        // Long batches run in micro-batches (llama.cpp's ubatch): the activation buffers stay small (a 512-token
        // prompt of 2B4T would otherwise hold ~100 MB of them) and every token's result is the same, since tokens
        // only meet through the KV cache, which each micro-batch fills before the next reads it.
        if batch.len() > MICRO_BATCH {
            let mut logits = Vec::new();
            for chunk in batch.chunks(MICRO_BATCH) {
                logits.extend(self.forward_checked(chunk, kv, pool)?);
            }
            return Ok(logits);
        }
        self.forward_checked(batch, kv, pool)
    }

    /// [`Model::forward`] for a batch that passed `check_batch`.
    fn forward_checked(&self, batch: &[BatchToken], kv: &mut KvCache, pool: &ThreadPool) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let n = batch.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let (d, qd, kvd, ff, hd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.head_dim);

        let mut x = vec![0f32; n * d];
        for (t, bt) in batch.iter().enumerate() {
            self.embed(bt.token as usize, &mut x[t * d..(t + 1) * d]);
        }
        let rope: Vec<Vec<(f32, f32)>> = batch
            .iter()
            .map(|bt| {
                ops::rope_cos_sin(bt.pos, cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale, self.rope_freqs.as_deref())
            })
            .collect();
        let neox = cfg.rope_style == RopeStyle::Neox;

        let mut h = vec![0f32; n * d];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut attn = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * d];
        let (mut g, mut u) = (vec![0f32; n * ff], vec![0f32; n * ff]);

        for (li, layer) in self.layers.iter().enumerate() {
            per_token(pool, &mut h, d, &|t, h| ops::rms_norm(&x[t * d..(t + 1) * d], &layer.attn_norm, cfg.rms_eps, h));
            forward_group(&[&layer.wq, &layer.wk, &layer.wv], &h, &mut [&mut q, &mut k, &mut v], pool);
            for (buf, len, norm) in [(&mut q, qd, &layer.q_norm), (&mut k, kvd, &layer.k_norm)] {
                per_token(pool, buf, len, &|t, row| {
                    for head in row.chunks_exact_mut(hd) {
                        if let Some(w) = norm {
                            ops::rms_norm_inplace(head, w, cfg.rms_eps);
                        }
                        ops::rope(&mut head[..cfg.rope_dim], &rope[t], neox);
                    }
                });
            }
            for (t, bt) in batch.iter().enumerate() {
                kv.write(bt.seq, li, bt.pos, &k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd]);
            }
            self.attention(batch, li, &q, kv, &mut attn, pool);
            if let Some(w) = &layer.attn_sub_norm {
                per_token(pool, &mut attn, qd, &|_, row| ops::rms_norm_inplace(row, w, cfg.rms_eps));
            }
            layer.wo.forward(&attn, &mut None, &mut proj, pool);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            per_token(pool, &mut h, d, &|t, h| ops::rms_norm(&x[t * d..(t + 1) * d], &layer.ffn_norm, cfg.rms_eps, h));
            forward_group(&[&layer.w_gate, &layer.w_up], &h, &mut [&mut g, &mut u], pool);
            per_token(pool, &mut g, ff, &|t, g| {
                let u = &u[t * ff..(t + 1) * ff];
                match cfg.ffn_act {
                    FfnActivation::SiluGated => g.iter_mut().zip(u).for_each(|(a, b)| *a = ops::silu(*a) * b),
                    FfnActivation::ReluSqrGated => g.iter_mut().zip(u).for_each(|(a, b)| {
                        let r = a.max(0.0);
                        *a = r * r * b
                    }),
                }
                if let Some(w) = &layer.ffn_sub_norm {
                    ops::rms_norm_inplace(g, w, cfg.rms_eps);
                }
            });
            layer.w_down.forward(&g, &mut None, &mut proj, pool);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }

        for bt in batch {
            kv.record(bt.seq, bt.pos, bt.token);
        }
        let wanted: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        let mut xn = vec![0f32; wanted.len() * d];
        for (i, &t) in wanted.iter().enumerate() {
            ops::rms_norm(&x[t * d..(t + 1) * d], &self.output_norm, cfg.rms_eps, &mut xn[i * d..(i + 1) * d]);
        }
        let mut logits = vec![0f32; wanted.len() * cfg.n_vocab];
        if !wanted.is_empty() {
            self.head().matmul_f32(&xn, &mut logits, pool);
        }
        Ok(logits)
    }

    fn check_batch(&self, batch: &[BatchToken], kv: &KvCache) -> Result<()> {
        let mut next: Vec<Option<usize>> = vec![None; kv.n_seq()];
        for bt in batch {
            if bt.token as usize >= self.cfg.n_vocab {
                bail!("token id {} is outside the vocabulary ({})", bt.token, self.cfg.n_vocab);
            }
            if bt.seq >= kv.n_seq() {
                bail!("sequence {} has no KV slot ({} slots)", bt.seq, kv.n_seq());
            }
            if bt.pos >= kv.n_ctx {
                bail!("position {} is beyond the context size {}", bt.pos, kv.n_ctx);
            }
            let expected = next[bt.seq].unwrap_or(kv.seq_len(bt.seq));
            if bt.pos > expected || (next[bt.seq].is_some() && bt.pos != expected) {
                bail!(
                    "sequence {}: position {} does not follow position {} (batch positions must be consecutive)",
                    bt.seq,
                    bt.pos,
                    expected
                );
            }
            next[bt.seq] = Some(bt.pos + 1);
        }
        Ok(())
    }

    /// Causal attention of every batch token over its own sequence's cache, positions 0..=pos.
    ///
    /// The rounding follows the reference engine of the architecture (see [`AttentionNumerics`]), so that greedy
    /// outputs agree token for token: llama.cpp's CPU flash attention (Q in f16, online softmax, f16 V accumulator)
    /// or bitnet.cpp's plain attention (Q in f16, f32 probabilities).
    fn attention(
        &self,
        batch: &[BatchToken],
        layer: usize,
        q: &[f32],
        kv: &KvCache,
        out: &mut [f32],
        pool: &ThreadPool,
    ) {
        let cfg = &self.cfg;
        let (hd, qd, kvd) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let group = cfg.n_head / cfg.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let dst = Disjoint::new(out);
        // Plain attention takes the query heads that share a KV head together (each key and value row is then
        // converted once for all of them) when that still leaves every thread several tasks; decode keeps one
        // task per head so two threads split its few heads evenly.
        let per_task = match cfg.attention {
            AttentionNumerics::F32Probs if batch.len() * cfg.n_head_kv >= 4 * pool.n_threads() => group,
            _ => 1,
        };
        let tasks_per_token = cfg.n_head / per_task;
        pool.run(batch.len() * tasks_per_token, &|task| {
            let (t, h) = (task / tasks_per_token, task % tasks_per_token * per_task);
            let bt = batch[t];
            let (kc, vc) = kv.layer(bt.seq, layer);
            let kvh = h / group;
            let qh: Vec<f32> =
                q[t * qd + h * hd..t * qd + (h + per_task) * hd].iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            // SAFETY: task (t, h) writes only heads h..h + per_task of token t.
            let o = unsafe { dst.slice(t * qd + h * hd, per_task * hd) };
            match cfg.attention {
                AttentionNumerics::F32Probs => {
                    let n = bt.pos + 1;
                    let mut p = vec![0f32; per_task * n];
                    scores_f16(&kc[kvh * hd..], kvd, n, &qh, hd, scale, &mut p);
                    for p in p.chunks_exact_mut(n) {
                        ops::softmax(p);
                    }
                    weighted_sum_f16(&vc[kvh * hd..], kvd, n, &p, hd, o);
                }
                AttentionNumerics::FlashF16 => {
                    let k_at = |p: usize| &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                    let v_at = |p: usize| &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                    let mut acc = vec![f16::ZERO; hd];
                    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
                    for j in 0..=bt.pos {
                        let s = dot_f16_f32(k_at(j), &qh) * scale;
                        let (mut ms, mut vs) = (1f32, 1f32);
                        if s > m {
                            ms = (m - s).exp();
                            m = s;
                            scale_f16(&mut acc, ms);
                        } else {
                            vs = (s - m).exp();
                        }
                        mad_f16(&mut acc, v_at(j), vs);
                        sum = sum * ms + vs;
                    }
                    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
                    for (o, a) in o.iter_mut().zip(&acc) {
                        *o = a.to_f32() * inv;
                    }
                }
            }
        });
    }
}
