//! Classification tasks cast as generation (prompt → label word), tokenized with the model's own tokenizer, and
//! their greedy accuracy under the inference engine. The training crate (BitDistill) uses the same definitions, so
//! the trainer's evaluation and the engine's see the same prompts and labels.
//!
//! - SST-2: "Review: {sentence}\nSentiment:" → " negative" / " positive"; train = `sst2/train.tsv`, test = the
//!   labelled GLUE dev set `sst2/glue-dev.tsv` (872 rows).
//! - QNLI: only the labelled GLUE dev set exists here, so it is split reproducibly: rows whose `index` is a
//!   multiple of 5 are the test set (1093 rows), the rest train. "Question: …\nSentence: …\nAnswer:" → " yes" / " no".
//!
//! Accuracy is greedy: the argmax over the whole vocabulary after the prompt must be the first token of the right
//! label word (an answer that is neither label counts as wrong).

use crate::decoder::{BatchToken, Model};
use anyhow::{bail, Context, Result};
use std::path::Path;
use ternlm_kernels::ThreadPool;
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

/// Greedy accuracy of the inference engine on the first `limit` test rows.
pub struct EngineAccuracy {
    pub accuracy: f64,
    /// Each row's predicted first token.
    pub predictions: Vec<u32>,
    /// Each row's top-1 minus top-2 logit: how far the prediction is from flipping (a near-tie explains a
    /// difference between two forward implementations).
    pub margins: Vec<f32>,
}

/// Greedy accuracy of the inference engine on the first `limit` test rows. Prompts run `batch` at a time as
/// separate sequences of one forward pass.
pub fn engine_accuracy(
    model: &Model,
    pool: &ThreadPool,
    task: &Task,
    batch: usize,
    limit: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<EngineAccuracy> {
    let test = &task.test[..limit.unwrap_or(task.test.len()).min(task.test.len())];
    let batch = batch.max(1);
    let n_ctx = test.iter().map(|e| e.prompt.len()).max().unwrap_or(1).max(1);
    let mut kv = model.new_kv_cache(n_ctx, batch);
    let mut preds = Vec::with_capacity(test.len());
    let mut margins = Vec::with_capacity(test.len());
    let mut correct = 0;
    let nv = model.cfg.n_vocab;
    for chunk in test.chunks(batch) {
        for s in 0..chunk.len() {
            kv.truncate(s, 0);
        }
        let tokens: Vec<BatchToken> = chunk
            .iter()
            .enumerate()
            .flat_map(|(s, e)| {
                let n = e.prompt.len();
                e.prompt.iter().enumerate().map(move |(i, &token)| BatchToken {
                    token,
                    pos: i,
                    seq: s,
                    logits: i + 1 == n,
                })
            })
            .collect();
        let logits = model.forward(&tokens, &mut kv, pool)?;
        for (e, row) in chunk.iter().zip(logits.chunks_exact(nv)) {
            // First maximum, as the trainer's argmax picks it.
            let p = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as u32;
            preds.push(p);
            let second =
                row.iter().enumerate().filter(|&(i, _)| i != p as usize).map(|(_, &v)| v).fold(f32::MIN, f32::max);
            margins.push(row[p as usize] - second);
            if p == task.label_tokens[e.label][0] {
                correct += 1;
            }
        }
        progress(preds.len(), test.len());
    }
    Ok(EngineAccuracy { accuracy: correct as f64 / test.len().max(1) as f64, predictions: preds, margins })
}
