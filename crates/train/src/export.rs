//! A trained student → GGUF that `ternlm run` loads: the source file's metadata and tokenizer, projections as
//! I2_S (the absmean ternary values the student trained with, through bitnet.cpp's quantizer), SubLN weights as
//! `attn_sub_norm` / `ffn_sub_norm`, embedding and head F16, norms F32.

use crate::model::TrainModel;
use crate::quant::ternary_values;
use anyhow::{Context, Result};
use half::f16;
use std::path::Path;
use ternlm_gguf::{GgmlType, GgufWriter, Value};

const BLOCK_ORDER: [&str; 17] = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_q.bias",
    "attn_k.weight",
    "attn_k.bias",
    "attn_v.weight",
    "attn_v.bias",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
    "attn_output.weight",
    "attn_output.bias",
    "attn_sub_norm.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "ffn_sub_norm.weight",
];

fn order_key(name: &str) -> (usize, usize, usize) {
    match name {
        "token_embd.weight" => (0, 0, 0),
        "output_norm.weight" => (2, 0, 0),
        "output.weight" => (3, 0, 0),
        _ => {
            let rest = name.strip_prefix("blk.").unwrap_or(name);
            let (l, t) = rest.split_once('.').unwrap_or(("0", rest));
            let pos = BLOCK_ORDER.iter().position(|b| *b == t).unwrap_or(BLOCK_ORDER.len());
            (1, l.parse().unwrap_or(usize::MAX), pos)
        }
    }
}

/// Writes the model; ternary projections when `ternary` (as trained), else everything in full precision.
/// `embd_type` (F16 or F32) is used for the embedding and an untied head.
pub fn export_gguf(m: &TrainModel, out: &Path, embd_type: GgmlType) -> Result<()> {
    let mut w = GgufWriter::new();
    for (k, v) in m.source.metadata() {
        w.set(k.clone(), v.clone());
    }
    w.set("general.file_type", Value::U32(if m.ternary { 40 } else { 0 }));
    let mut names: Vec<String> = m.vars.data().lock().unwrap().keys().cloned().collect();
    // Ties (names BLOCK_ORDER does not list) break by name: the var map is a HashMap, and the same model should
    // always export to the same bytes.
    names.sort_by(|a, b| order_key(a).cmp(&order_key(b)).then_with(|| a.cmp(b)));
    let mut blobs: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)> = Vec::new();
    for name in names {
        let t = m.get(&name).unwrap();
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        let (ty, bytes) = if m.ternary && TrainModel::is_projection(&name) {
            let v: Vec<f32> = ternary_values(&t)?.flatten_all()?.to_vec1()?;
            (GgmlType::I2_S, ternlm_kernels::quant::quantize_i2s(&v))
        } else if embd_type == GgmlType::F16 && (name == "token_embd.weight" || name == "output.weight") {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            (GgmlType::F16, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect())
        } else {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            (GgmlType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        blobs.push((name, ty, dims, bytes));
    }
    for (name, ty, dims, bytes) in &blobs {
        w.add_tensor(name.clone(), *ty, dims, bytes.as_slice())?;
    }
    let tmp = out.with_extension("gguf.tmp");
    w.write_to_file(&tmp)?;
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename", tmp.display()))?;
    Ok(())
}
