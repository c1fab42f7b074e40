//! Tasks cast as generation (prompt → label word) and plain-text corpora, tokenized with the model's own
//! tokenizer, and right-padded batches with loss masks.
//!
//! - SST-2: "Review: {sentence}\nSentiment:" → " positive" / " negative"; train = `sst2/train.tsv`, test = the
//!   labelled GLUE dev set `sst2/glue-dev.tsv` (872 rows).
//! - QNLI: only the labelled GLUE dev set exists here, so it is split reproducibly: rows whose `index` is a
//!   multiple of 5 are the test set (1093 rows), the rest train. "Question: …\nSentence: …\nAnswer:" → " yes" / " no".

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use ternlm_tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub label: usize,
}

pub struct Task {
    pub name: String,
    /// Label words (with their leading space) and their tokens.
    pub label_tokens: Vec<Vec<u32>>,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

fn read_tsv(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().context("empty file")?.split('\t').map(str::to_string).collect();
    let rows = lines.filter(|l| !l.is_empty()).map(|l| l.split('\t').map(str::to_string).collect()).collect();
    Ok((header, rows))
}

fn col(header: &[String], name: &str, path: &Path) -> Result<usize> {
    header.iter().position(|h| h == name).with_context(|| format!("{}: no column '{name}'", path.display()))
}

impl Task {
    pub fn load(name: &str, data_dir: &Path, tok: &Tokenizer) -> Result<Task> {
        let enc = |s: &str| tok.encode(s, true, false);
        let words: &[&str] = match name {
            "sst2" => &[" negative", " positive"],
            "qnli" => &[" yes", " no"],
            other => bail!("unknown task '{other}' (sst2, qnli)"),
        };
        let context = if name == "sst2" { "Sentiment:" } else { "Answer:" };
        let label_tokens = label_tokens(tok, context, words)?;
        let (mut train, mut test) = (Vec::new(), Vec::new());
        match name {
            "sst2" => {
                for (file, out) in [("sst2/train.tsv", &mut train), ("sst2/glue-dev.tsv", &mut test)] {
                    let path = data_dir.join(file);
                    let (h, rows) = read_tsv(&path)?;
                    let (s, l) = (col(&h, "sentence", &path)?, col(&h, "label", &path)?);
                    for r in rows {
                        let label: usize =
                            r[l].trim().parse().with_context(|| format!("{}: label '{}'", path.display(), r[l]))?;
                        out.push(Example { prompt: enc(&format!("Review: {}\nSentiment:", r[s].trim())), label });
                    }
                }
            }
            _ => {
                let path = data_dir.join("qnli/glue-dev.tsv");
                let (h, rows) = read_tsv(&path)?;
                let (i, q, s, l) = (
                    col(&h, "index", &path)?,
                    col(&h, "question", &path)?,
                    col(&h, "sentence", &path)?,
                    col(&h, "label", &path)?,
                );
                for r in rows {
                    let label = match r[l].trim() {
                        "entailment" => 0,
                        "not_entailment" => 1,
                        other => bail!("{}: label '{other}'", path.display()),
                    };
                    let e = Example { prompt: enc(&format!("Question: {}\nSentence: {}\nAnswer:", r[q], r[s])), label };
                    if r[i].trim().parse::<usize>().unwrap_or(1) % 5 == 0 {
                        test.push(e);
                    } else {
                        train.push(e);
                    }
                }
            }
        }
        Ok(Task { name: name.into(), label_tokens, train, test })
    }
}

/// The tokens of each label word as they follow `context` (e.g. "Sentiment:") — tokenized in context, so
/// SentencePiece's word-initial "▁" and BPE's leading-space tokens both come out right. The first tokens must
/// differ (accuracy is the greedy first token).
pub fn label_tokens(tok: &Tokenizer, context: &str, words: &[&str]) -> Result<Vec<Vec<u32>>> {
    let base = tok.encode(context, false, false);
    let mut out = Vec::new();
    for w in words {
        let full = tok.encode(&format!("{context}{w}"), false, false);
        if !full.starts_with(&base) || full.len() == base.len() {
            bail!("'{w}' does not tokenize as a continuation of '{context}'");
        }
        out.push(full[base.len()..].to_vec());
    }
    if out.windows(2).any(|p| p[0][0] == p[1][0]) {
        bail!("the label words {words:?} start with the same token; greedy accuracy needs them to differ");
    }
    Ok(out)
}

/// A right-padded batch: inputs [B, T], next-token targets [B·T], loss mask [B·T], key mask [B, T].
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub key_mask: Tensor,
    pub n_tokens: usize,
    /// Flat indices (into B·T) of the supervised positions, and their targets: the loss needs logits only there.
    pub loss_rows: Tensor,
    pub loss_targets: Tensor,
    pub n_loss_rows: usize,
}

/// Builds a batch from (sequence, index where the supervised part starts) pairs; sequences longer than `max_len`
/// keep their end.
pub fn make_batch(seqs: &[(Vec<u32>, usize)], max_len: usize, dev: &Device) -> Result<Batch> {
    let t = seqs.iter().map(|(s, _)| s.len().min(max_len + 1) - 1).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let (mut tok, mut tgt, mut lm, mut km) =
        (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t], vec![0f32; b * t]);
    for (i, (s, sup)) in seqs.iter().enumerate() {
        let cut = s.len().saturating_sub(max_len + 1);
        let s = &s[cut..];
        let sup = sup.saturating_sub(cut);
        for j in 0..s.len() - 1 {
            tok[i * t + j] = s[j];
            tgt[i * t + j] = s[j + 1];
            km[i * t + j] = 1.0;
            if j + 1 >= sup {
                lm[i * t + j] = 1.0;
            }
        }
    }
    let n_tokens = km.iter().filter(|&&v| v > 0.0).count();
    let rows: Vec<u32> = (0..b * t).filter(|&i| lm[i] > 0.0).map(|i| i as u32).collect();
    let row_targets: Vec<u32> = rows.iter().map(|&i| tgt[i as usize]).collect();
    let n_loss_rows = rows.len();
    Ok(Batch {
        loss_rows: Tensor::from_vec(rows, n_loss_rows, dev)?,
        loss_targets: Tensor::from_vec(row_targets, n_loss_rows, dev)?,
        n_loss_rows,
        tokens: Tensor::from_vec(tok, (b, t), dev)?,
        targets: Tensor::from_vec(tgt, b * t, dev)?,
        loss_mask: Tensor::from_vec(lm, b * t, dev)?,
        key_mask: Tensor::from_vec(km, (b, t), dev)?,
        n_tokens,
    })
}

/// Token chunks of `len + 1` from a text file (for continued pre-training); the model's BOS starts each chunk.
pub fn text_chunks(path: &Path, tok: &Tokenizer, len: usize) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let ids = tok.encode(&text, false, false);
    Ok(ids.chunks_exact(len).map(|c| tok.bos.into_iter().chain(c.iter().copied()).collect()).collect())
}
