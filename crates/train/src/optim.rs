//! AdamW with its state in plain tensors (so a checkpoint holds it and a resumed run continues exactly), and the
//! warmup + decay learning-rate schedule.

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Linear warmup for `warmup` steps, then cosine decay to 10% of the peak at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// (name, parameter, first moment, second moment)
    params: Vec<(String, Var, Tensor, Tensor)>,
    pub step: usize,
}

impl AdamW {
    pub fn new(named: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        let params = named
            .into_iter()
            .map(|(n, v)| {
                let z = v.zeros_like()?;
                Ok((n, v, z.clone(), z))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, step: 0 })
    }

    /// One update with the gradients of `loss`; `lr` overrides the configured rate (the schedule).
    pub fn step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for (_, var, m, v) in self.params.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The optimizer's state as named tensors (moments and step), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (n, _, m, v) in &self.params {
            out.insert(format!("adam.m.{n}"), m.clone());
            out.insert(format!("adam.v.{n}"), v.clone());
        }
        out.insert("adam.step".into(), Tensor::new(&[self.step as u32], &candle_core::Device::Cpu)?);
        Ok(out)
    }

    pub fn load_state(&mut self, st: &HashMap<String, Tensor>) -> Result<()> {
        for (n, _, m, v) in self.params.iter_mut() {
            *m = st.get(&format!("adam.m.{n}")).with_context(|| format!("checkpoint lacks adam.m.{n}"))?.clone();
            *v = st.get(&format!("adam.v.{n}")).with_context(|| format!("checkpoint lacks adam.v.{n}"))?.clone();
        }
        self.step = st.get("adam.step").context("checkpoint lacks adam.step")?.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

/// Writes tensors atomically: to `path.tmp`, fsync, rename. A kill at any moment leaves the old file or the new.
pub fn save_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(tensors, &tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename to {}", tmp.display(), path.display()))?;
    Ok(())
}
