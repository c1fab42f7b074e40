//! The decoder for training: the same architecture flags and tensor names as ternlm's inference decoder
//! (`ternlm_model::ModelConfig`), written with candle ops so it has gradients. Parameters live in a `VarMap` keyed
//! by GGUF tensor names, which makes loading from a GGUF, checkpointing (safetensors) and exporting back to GGUF
//! one name space. Projections are BitNet layers (absmean ternary weights × per-token int8 activations, STE) when
//! `ternary` is set; embeddings, head and norms stay full precision.

use crate::quant::linear;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_model::config::{FfnActivation, ModelConfig, RopeStyle};

/// Q, K, V of one layer for attention-relation distillation: [B, T, heads·head_dim] each (Q and K after QK-norm and
/// RoPE, V raw, K/V not repeated for GQA).
pub struct Captured {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

/// Where Stage 1 puts its RMSNorms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SubLn {
    /// The paper's: before the attention output and FFN down projections (BitNet 2B4T's sub-norms).
    Paper,
    /// The official scripts': before every quantized projection.
    #[value(name = "allnorm")]
    AllNorm,
}

const IN_NORMS: [&str; 5] =
    ["attn_q_in_norm", "attn_k_in_norm", "attn_v_in_norm", "ffn_gate_in_norm", "ffn_up_in_norm"];

pub struct TrainModel {
    pub cfg: ModelConfig,
    pub vars: VarMap,
    pub ternary: bool,
    /// Round Q, K, V to f16 as the inference engine's KV cache does (for checking training against inference).
    pub f16_qkv: bool,
    /// The GGUF the model came from (its metadata and tokenizer are copied into exports).
    pub source: Arc<GgufFile>,
    dev: Device,
}

fn dequantize(f: &GgufFile, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let info = f.tensor_info(name).with_context(|| format!("{}: no tensor '{name}'", f.path().display()))?;
    let (cols, rows) = (info.row_len(), info.n_rows());
    let v = ternlm_kernels::scalar::dequantize_tensor(info.ty, f.tensor_data(info), rows, cols)
        .map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", f.path().display()))?;
    let shape = if info.dims.len() == 1 { vec![cols] } else { vec![rows, cols] };
    Ok((shape, v))
}

impl TrainModel {
    /// Loads every tensor of a GGUF (dequantized to f32) as a trainable variable.
    pub fn from_gguf(f: Arc<GgufFile>, ternary: bool) -> Result<TrainModel> {
        let cfg = ModelConfig::from_gguf(&f)?;
        if cfg.rope_freq_scale != 1.0 || f.tensor_info("rope_freqs.weight").is_some() {
            bail!("{}: RoPE scaling is not supported for training yet", f.path().display());
        }
        let dev = Device::Cpu;
        let vars = VarMap::new();
        {
            let mut data = vars.data().lock().unwrap();
            for info in f.tensors() {
                let (shape, mut v) = dequantize(&f, &info.name)?;
                let stored_ternary = matches!(info.ty, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0);
                if ternary && stored_ternary && Self::is_projection(&info.name) {
                    // Already ternary (Δ·{-1,0,1}): re-ternarizing those values would give the scale Δ·p (p = the
                    // nonzero fraction) and a different forward. Latent codes·Δ/p ternarize back exactly.
                    let nonzero = v.iter().filter(|x| **x != 0.0).count();
                    if nonzero > 0 {
                        let p = nonzero as f64 / v.len() as f64;
                        v.iter_mut().for_each(|x| *x = (*x as f64 / p) as f32);
                    }
                }
                data.insert(info.name.clone(), Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?);
            }
        }
        Ok(TrainModel { cfg, vars, ternary, f16_qkv: false, source: f, dev })
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.vars.data().lock().unwrap().get(name).map(|v| v.as_tensor().clone())
    }

    fn req(&self, name: &str) -> Result<Tensor> {
        self.get(name).with_context(|| format!("model has no tensor '{name}'"))
    }

    /// Stage 1 (SubLN): RMSNorms, weight 1, before the attention output and FFN down projections, where missing;
    /// with [`SubLn::AllNorm`] also before every other projection (`<proj>_in_norm`, the official scripts'
    /// variant). Returns how many were added.
    pub fn add_sub_norms(&self, placement: SubLn) -> Result<usize> {
        let mut data = self.vars.data().lock().unwrap();
        let mut n = 0;
        let (d, qd, ff) = (self.cfg.n_embd, self.cfg.q_dim(), self.cfg.n_ff);
        let mut norms = vec![("attn_sub_norm", qd), ("ffn_sub_norm", ff)];
        if placement == SubLn::AllNorm {
            norms.extend(IN_NORMS.iter().map(|&name| (name, d)));
        }
        for l in 0..self.cfg.n_layer {
            for &(name, width) in &norms {
                if let std::collections::hash_map::Entry::Vacant(e) = data.entry(format!("blk.{l}.{name}.weight")) {
                    e.insert(Var::ones(width, DType::F32, &self.dev)?);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// The projections (what a ternary export stores as I2_S).
    pub fn is_projection(name: &str) -> bool {
        ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
            .iter()
            .any(|p| name.ends_with(&format!(".{p}.weight")))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(ms.affine(1.0, self.cfg.rms_eps as f64))?.sqrt()?)?.broadcast_mul(w)?)
    }

    /// cos, sin of shape [T, rope_dim/2].
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.rope_dim / 2;
        let mut c = Vec::with_capacity(t * half);
        let mut s = Vec::with_capacity(t * half);
        for p in 0..t {
            for i in 0..half {
                let theta = p as f32 * self.cfg.rope_base.powf(-((2 * i) as f32) / self.cfg.rope_dim as f32);
                c.push(theta.cos());
                s.push(theta.sin());
            }
        }
        Ok((Tensor::from_vec(c, (t, half), &self.dev)?, Tensor::from_vec(s, (t, half), &self.dev)?))
    }

    /// RoPE on [B, H, T, hd] (rotating the first `rope_dim` of each head).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let rd = self.cfg.rope_dim;
        let half = rd / 2;
        let (xr, rest) = (x.narrow(3, 0, rd)?, if rd < hd { Some(x.narrow(3, rd, hd - rd)?) } else { None });
        let rotated = match self.cfg.rope_style {
            RopeStyle::Neox => {
                let (x1, x2) = (xr.narrow(3, 0, half)?, xr.narrow(3, half, half)?);
                let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
                let bb = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
                Tensor::cat(&[a, bb], 3)?
            }
            RopeStyle::Interleaved => {
                let xr = xr.reshape((b, h, t, half, 2))?;
                let (xe, xo) = (xr.narrow(4, 0, 1)?.squeeze(4)?, xr.narrow(4, 1, 1)?.squeeze(4)?);
                let a = (xe.broadcast_mul(cos)? - xo.broadcast_mul(sin)?)?;
                let bb = (xo.broadcast_mul(cos)? + xe.broadcast_mul(sin)?)?;
                Tensor::stack(&[a, bb], 4)?.reshape((b, h, t, rd))?
            }
        };
        Ok(match rest {
            Some(r) => Tensor::cat(&[rotated, r], 3)?,
            None => rotated,
        })
    }

    fn f16_round(&self, x: Tensor) -> Result<Tensor> {
        Ok(if self.f16_qkv { x.to_dtype(DType::F16)?.to_dtype(DType::F32)? } else { x })
    }

    /// Logits [B, T, V] for right-padded token ids [B, T] (u32), and Q/K/V of layer `capture` if asked.
    pub fn forward(&self, tokens: &Tensor, capture: Option<usize>) -> Result<(Tensor, Option<Captured>)> {
        let (x, captured) = self.hidden(tokens, capture)?;
        Ok((self.head(&x)?, captured))
    }

    /// Logits [N, V] at the flat positions `rows` ([N] u32 indices into B·T) only. Task fine-tuning supervises
    /// one or two positions per sequence, and the head (vocabulary × width) plus its softmax is the largest
    /// single cost of a small model's step, so this skips it everywhere else.
    pub fn forward_rows(
        &self,
        tokens: &Tensor,
        capture: Option<usize>,
        rows: &Tensor,
    ) -> Result<(Tensor, Option<Captured>)> {
        let (x, captured) = self.hidden(tokens, capture)?;
        let x = x.reshape(((), self.cfg.n_embd))?.index_select(rows, 0)?;
        Ok((self.head(&x)?, captured))
    }

    /// The output head on final hidden states [.., D].
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let head = match self.get("output.weight") {
            Some(w) if !self.cfg.force_tied_head => w,
            _ => self.req("token_embd.weight")?,
        };
        Ok(x.broadcast_matmul(&head.t()?)?)
    }

    /// Final normed hidden states [B, T, D] and the captured Q/K/V.
    fn hidden(&self, tokens: &Tensor, capture: Option<usize>) -> Result<(Tensor, Option<Captured>)> {
        let cfg = &self.cfg;
        let (b, t) = tokens.dims2()?;
        let (h, kvh, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let embd = self.req("token_embd.weight")?;
        let mut x = embd.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, cfg.n_embd))?;
        let (cos, sin) = self.rope_tables(t)?;
        let causal: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
        let causal = Tensor::from_vec(causal, (t, t), &self.dev)?;
        let mut captured = None;
        let tern = self.ternary;
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{l}.{s}");
            let lin = |x: &Tensor, name: &str| -> Result<Tensor> {
                let w = self.req(&p(&format!("{name}.weight")))?;
                let bias = self.get(&p(&format!("{name}.bias")));
                match self.get(&p(&format!("{name}_in_norm.weight"))) {
                    Some(nw) => Ok(linear(&self.rms_norm(x, &nw)?, &w, bias.as_ref(), tern)?),
                    None => Ok(linear(x, &w, bias.as_ref(), tern)?),
                }
            };
            let hn = self.rms_norm(&x, &self.req(&p("attn_norm.weight"))?)?;
            let q = lin(&hn, "attn_q")?.reshape((b, t, h, hd))?.transpose(1, 2)?;
            let k = lin(&hn, "attn_k")?.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
            let v = lin(&hn, "attn_v")?.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
            let (q, k) = match (self.get(&p("attn_q_norm.weight")), self.get(&p("attn_k_norm.weight"))) {
                (Some(qn), Some(kn)) => (self.rms_norm(&q, &qn)?, self.rms_norm(&k, &kn)?),
                _ => (q, k),
            };
            let q = self.f16_round(self.rope(&q.contiguous()?, &cos, &sin)?)?;
            let k = self.f16_round(self.rope(&k.contiguous()?, &cos, &sin)?)?;
            let v = self.f16_round(v.contiguous()?)?;
            if capture == Some(l) {
                let cat = |x: &Tensor, n: usize| x.transpose(1, 2)?.reshape((b, t, n * hd));
                captured = Some(Captured { q: cat(&q, h)?, k: cat(&k, kvh)?, v: cat(&v, kvh)? });
            }
            let group = h / kvh;
            let rep = |x: &Tensor| -> candle_core::Result<Tensor> {
                if group == 1 {
                    return Ok(x.clone());
                }
                x.unsqueeze(2)?.expand((b, kvh, group, t, hd))?.reshape((b, h, t, hd))
            };
            let (k, v) = (rep(&k)?, rep(&v)?);
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(&causal)?;
            let probs = crate::loss::softmax(&scores)?;
            let mut a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
            if let Some(w) = self.get(&p("attn_sub_norm.weight")) {
                a = self.rms_norm(&a, &w)?;
            }
            x = (x + lin(&a, "attn_output")?)?;
            let hn = self.rms_norm(&x, &self.req(&p("ffn_norm.weight"))?)?;
            let g = lin(&hn, "ffn_gate")?;
            let u = lin(&hn, "ffn_up")?;
            let act = match cfg.ffn_act {
                FfnActivation::SiluGated => candle_nn::ops::silu(&g)?,
                FfnActivation::ReluSqrGated => g.relu()?.sqr()?,
            };
            let mut m = (act * u)?;
            if let Some(w) = self.get(&p("ffn_sub_norm.weight")) {
                m = self.rms_norm(&m, &w)?;
            }
            x = (x + lin(&m, "ffn_down")?)?;
        }
        Ok((self.rms_norm(&x, &self.req("output_norm.weight")?)?, captured))
    }
}
