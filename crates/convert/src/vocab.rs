//! Tokenizers between Hugging Face files and GGUF `tokenizer.ggml.*` keys, following llama.cpp's converter:
//! `tokenizer.json` (byte-level BPE) → `gpt2` vocabularies with merges and the `tokenizer.ggml.pre` that names
//! the pre-tokenizer; SentencePiece `tokenizer.model` → `llama` vocabularies with scores. Token types, the
//! `[PAD{i}]` filling up to the model's vocab size, special ids and the chat template come along. The reverse
//! (for `export-hf`) writes files the `tokenizers` library and SentencePiece read.

use crate::hf::read_json_opt;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as J};
use std::collections::HashMap;
use std::path::Path;
use ternlm_gguf::{Array, GgufFile, Value};

// llama.cpp's token types.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;
pub const BYTE: i32 = 6;

/// What to write as `tokenizer.ggml.pre`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreChoice {
    /// Recognise the pre-tokenizer in `tokenizer.json`.
    Detect,
    Named(String),
    /// Write no key, as the official BitNet 2B4T GGUF does (llama.cpp then uses its `default` rules).
    Omit,
}

const LLAMA3_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_HF: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The llama.cpp pre-tokenizer name of a `tokenizer.json` `pre_tokenizer`, when it is one ternlm knows.
pub fn detect_pre(pre: &J) -> Option<&'static str> {
    let ty = |v: &J| v.get("type").and_then(|t| t.as_str()).unwrap_or("").to_string();
    let byte_level_regex = |v: &J| ty(v) == "ByteLevel" && v.get("use_regex").and_then(|b| b.as_bool()).unwrap_or(true);
    let split_regex = |v: &J| -> Option<String> {
        (ty(v) == "Split").then(|| v.get("pattern")?.get("Regex")?.as_str().map(str::to_string)).flatten()
    };
    if byte_level_regex(pre) {
        return Some("gpt-2");
    }
    let seq: Vec<&J> = pre.get("pretokenizers")?.as_array()?.iter().collect();
    match seq.as_slice() {
        [split, bl] if ty(bl) == "ByteLevel" && !byte_level_regex(bl) => match split_regex(split)?.as_str() {
            LLAMA3_HF => Some("llama-bpe"),
            QWEN2_HF => Some("qwen2"),
            _ => None,
        },
        [digits, bl]
            if ty(digits) == "Digits"
                && digits.get("individual_digits").and_then(|b| b.as_bool()) == Some(true)
                && byte_level_regex(bl) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

/// The `tokenizer.json` `pre_tokenizer` for a llama.cpp pre-tokenizer name (inverse of [`detect_pre`]); files
/// without the key (BitNet 2B4T) get the Llama-3 rules the model was trained with.
fn pre_tokenizer_json(pre: Option<&str>) -> Result<J> {
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    Ok(match pre.unwrap_or("llama-bpe") {
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "default" => split(LLAMA3_HF),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_HF),
        "gpt-2" => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
        other => bail!("export-hf cannot express pre-tokenizer '{other}' as a tokenizer.json (known: llama-bpe, qwen2, gpt-2, smollm)"),
    })
}

/// A special token in `tokenizer_config.json`: a string, `{"content": …}`, or null.
fn token_text(v: Option<&J>) -> Option<String> {
    match v? {
        J::String(s) => Some(s.clone()),
        J::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || t.starts_with("<start_of_")
        || t.starts_with("<end_of_")
}

/// Everything `convert` writes under `tokenizer.*`, read from the model directory.
pub fn vocab_keys(dir: &Path, config: &J, n_vocab: usize, pre: &PreChoice) -> Result<Vec<(String, Value)>> {
    let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(J::Null);
    let tok_json_path = dir.join("tokenizer.json");
    let sp_path = dir.join("tokenizer.model");
    let tok_json = read_json_opt(&tok_json_path)?;
    let byte_level = tok_json.as_ref().is_some_and(|t| {
        t.get("model").and_then(|m| m.get("type")).and_then(|v| v.as_str()) == Some("BPE")
            && !t.get("model").and_then(|m| m.get("byte_fallback")).and_then(|b| b.as_bool()).unwrap_or(false)
    });
    let mut keys: Vec<(String, Value)> = Vec::new();
    let tokens = if byte_level {
        let t = tok_json.as_ref().unwrap();
        let (tokens, types) = bpe_tokens(&tok_json_path, t, n_vocab)?;
        keys.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        let pre_name = match pre {
            PreChoice::Omit => None,
            PreChoice::Named(n) => Some(n.clone()),
            PreChoice::Detect => {
                let p = t.get("pre_tokenizer").unwrap_or(&J::Null);
                Some(detect_pre(p).map(str::to_string).with_context(|| {
                    format!(
                        "{}: pre_tokenizer {} is not one ternlm recognises; pass --pre NAME (llama.cpp's name, e.g. llama-bpe, qwen2, smollm, gpt-2) or --no-pre",
                        tok_json_path.display(),
                        short(p)
                    )
                })?)
            }
        };
        if let Some(p) = pre_name {
            keys.push(("tokenizer.ggml.pre".into(), Value::String(p)));
        }
        keys.push(("tokenizer.ggml.tokens".into(), Value::Array(Array::String(tokens.clone()))));
        keys.push(("tokenizer.ggml.token_type".into(), Value::Array(Array::I32(types))));
        let merges =
            t.get("model").and_then(|m| m.get("merges")).and_then(|m| m.as_array()).with_context(|| {
                format!("{}: field 'model.merges' is missing or not a list", tok_json_path.display())
            })?;
        let merges = merges
            .iter()
            .map(|m| match m {
                J::String(s) => Ok(s.clone()),
                J::Array(p) if p.len() == 2 && p.iter().all(|x| x.is_string()) => {
                    Ok(format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()))
                }
                other => {
                    bail!("{}: merge {} is neither \"a b\" nor [\"a\", \"b\"]", tok_json_path.display(), short(other))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        keys.push(("tokenizer.ggml.merges".into(), Value::Array(Array::String(merges))));
        tokens
    } else if sp_path.exists() {
        let bytes = std::fs::read(&sp_path).with_context(|| format!("{}: cannot read", sp_path.display()))?;
        let sp = SpModel::parse(&bytes).with_context(|| format!("{}: not a SentencePiece model", sp_path.display()))?;
        let (mut tokens, mut scores, mut types): (Vec<String>, Vec<f32>, Vec<i32>) = (
            sp.pieces.iter().map(|p| p.0.clone()).collect(),
            sp.pieces.iter().map(|p| p.1).collect(),
            sp.pieces.iter().map(|p| p.2).collect(),
        );
        // Added tokens beyond the SentencePiece model (e.g. 1bitLLM's 32000 + pad tokens).
        let mut added: Vec<(usize, String, bool)> = Vec::new();
        if let Some(t) = &tok_json {
            for a in t.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
                if let (Some(id), Some(c)) =
                    (a.get("id").and_then(|v| v.as_u64()), a.get("content").and_then(|v| v.as_str()))
                {
                    added.push((
                        id as usize,
                        c.to_string(),
                        a.get("special").and_then(|v| v.as_bool()).unwrap_or(true),
                    ));
                }
            }
        } else if let Some(J::Object(m)) = read_json_opt(&dir.join("added_tokens.json"))? {
            for (c, id) in m {
                if let Some(id) = id.as_u64() {
                    added.push((id as usize, c.clone(), true));
                }
            }
        }
        if tokens.len() > n_vocab {
            bail!("{}: {} pieces, more than config.json vocab_size {n_vocab}", sp_path.display(), tokens.len());
        }
        tokens.resize_with(n_vocab, String::new);
        scores.resize(n_vocab, -1000.0);
        types.resize(n_vocab, 0);
        for (id, c, special) in added {
            if id >= n_vocab {
                bail!("added token '{c}' has id {id}, beyond config.json vocab_size {n_vocab}");
            }
            if id >= sp.pieces.len() {
                tokens[id] = c;
                types[id] = if special { CONTROL } else { USER_DEFINED };
            }
        }
        for (i, (t, ty)) in tokens.iter_mut().zip(types.iter_mut()).enumerate() {
            if *ty == 0 {
                *t = format!("[PAD{i}]");
                *ty = UNUSED;
            }
        }
        keys.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        keys.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        keys.push(("tokenizer.ggml.tokens".into(), Value::Array(Array::String(tokens.clone()))));
        keys.push(("tokenizer.ggml.scores".into(), Value::Array(Array::F32(scores))));
        keys.push(("tokenizer.ggml.token_type".into(), Value::Array(Array::I32(types))));
        for (key, id) in [("bos", sp.bos), ("eos", sp.eos), ("unknown", sp.unk), ("padding", sp.pad)] {
            if id >= 0 && (id as usize) < n_vocab {
                keys.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id as u32)));
            }
        }
        if !sp.add_dummy_prefix {
            keys.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
        }
        tokens
    } else if tok_json.is_some() {
        bail!("{}: only byte-level BPE tokenizer.json files are converted; for SentencePiece models put tokenizer.model beside it", tok_json_path.display());
    } else {
        bail!("{}: no tokenizer.json or tokenizer.model", dir.display());
    };

    // Special token ids: tokenizer_config.json's texts first, then config.json's ids (llama.cpp's order).
    let id_of: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    for (hf, key) in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")] {
        let gkey = format!("tokenizer.ggml.{key}_token_id");
        let from_text = token_text(tok_cfg.get(format!("{hf}_token"))).and_then(|t| id_of.get(t.as_str()).copied());
        let from_cfg = match config.get(format!("{hf}_token_id")) {
            Some(J::Number(n)) => n.as_u64().map(|v| v as usize),
            Some(J::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as usize),
            _ => None,
        };
        if let Some(id) = from_text.or(from_cfg).filter(|&i| i < n_vocab) {
            keys.retain(|(k, _)| *k != gkey);
            keys.push((gkey, Value::U32(id as u32)));
        }
    }
    let add_bos = tok_cfg.get("add_bos_token").and_then(|b| b.as_bool()).or_else(|| {
        let bos = token_text(tok_cfg.get("bos_token"))?;
        tok_json.as_ref().and_then(|t| template_adds(t.get("post_processor")?, &bos))
    });
    if let Some(b) = add_bos {
        keys.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
    }
    if let Some(b) = tok_cfg.get("add_eos_token").and_then(|b| b.as_bool()) {
        keys.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(b)));
    }
    if let Some(t) = chat_template(dir, &tok_cfg)? {
        keys.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(keys)
}

fn short(v: &J) -> String {
    let s = v.to_string();
    if s.len() > 160 {
        format!("{}…", &s[..s.floor_char_boundary(160)])
    } else {
        s
    }
}

/// Whether a `TemplateProcessing` post-processor (possibly inside a `Sequence`) puts `special` first.
fn template_adds(pp: &J, special: &str) -> Option<bool> {
    match pp.get("type")?.as_str()? {
        "TemplateProcessing" => {
            let first = pp.get("single")?.as_array()?.first()?;
            Some(first.get("SpecialToken").and_then(|s| s.get("id")).and_then(|i| i.as_str()) == Some(special))
        }
        "Sequence" => pp.get("processors")?.as_array()?.iter().find_map(|p| template_adds(p, special)),
        _ => None,
    }
}

fn chat_template(dir: &Path, tok_cfg: &J) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map(Some).with_context(|| format!("{}: cannot read", jinja.display()));
    }
    let from_json = read_json_opt(&dir.join("chat_template.json"))?;
    let t = from_json.as_ref().and_then(|j| j.get("chat_template")).or(tok_cfg.get("chat_template"));
    Ok(match t {
        Some(J::String(s)) => Some(s.clone()),
        // A list of named templates: the one called "default".
        Some(J::Array(list)) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// Token texts and types of a byte-level BPE `tokenizer.json`, filled to `n_vocab` with `[PAD{i}]`.
fn bpe_tokens(path: &Path, t: &J, n_vocab: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let vocab = t
        .get("model")
        .and_then(|m| m.get("vocab"))
        .and_then(|v| v.as_object())
        .with_context(|| format!("{}: field 'model.vocab' is missing or not an object", path.display()))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n_vocab];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("{}: token '{text}' has id {id}, beyond config.json vocab_size {n_vocab}", path.display())
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in vocab {
        let id = id.as_u64().with_context(|| format!("{}: model.vocab['{text}'] is not an id", path.display()))?;
        put(id, text, NORMAL)?;
    }
    for a in t.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
        let (Some(id), Some(text)) = (a.get("id").and_then(|v| v.as_u64()), a.get("content").and_then(|v| v.as_str()))
        else {
            bail!("{}: an added_tokens entry lacks 'id' or 'content': {}", path.display(), short(a));
        };
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        if special || looks_special(text) {
            put(id, text, CONTROL)?;
        } else {
            put(id, &text.replace('\u{2581}', " "), USER_DEFINED)?;
        }
    }
    Ok(tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED))).unzip())
}

// ---------------------------------------------------------------------------------------------------------------
// SentencePiece model protobuf (ModelProto): just the fields a GGUF vocabulary needs.
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct SpModel {
    /// (piece, score, type) with SentencePiece's type numbers, which equal llama.cpp's.
    pub pieces: Vec<(String, f32, i32)>,
    pub unk: i64,
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
    pub add_dummy_prefix: bool,
}

struct Pb<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Pb<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let Some(&byte) = self.b.get(self.i) else { bail!("truncated varint at byte {}", self.i) };
            self.i += 1;
            if shift == 63 && byte > 1 {
                bail!("varint overflows 64 bits at byte {}", self.i);
            }
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes at byte {}", self.i)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.i.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            bail!("field of {n} bytes at byte {} runs past the end ({})", self.i, self.b.len())
        };
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }

    /// Next (field number, value): varints as `Ok(Left)`, length-delimited and fixed-width as bytes.
    fn next(&mut self) -> Result<Option<(u64, PbVal<'a>)>> {
        if self.i >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        let v = match wire {
            0 => PbVal::Int(self.varint()?),
            1 => PbVal::Bytes(self.take(8)?),
            2 => {
                let n = self.varint()?;
                PbVal::Bytes(self.take(usize::try_from(n).unwrap_or(usize::MAX))?)
            }
            5 => PbVal::Bytes(self.take(4)?),
            w => bail!("unsupported protobuf wire type {w} (field {field}) at byte {}", self.i),
        };
        Ok(Some((field, v)))
    }
}

enum PbVal<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl SpModel {
    pub fn parse(b: &[u8]) -> Result<SpModel> {
        let mut m = SpModel { pieces: Vec::new(), unk: 0, bos: 1, eos: 2, pad: -1, add_dummy_prefix: true };
        let mut top = Pb { b, i: 0 };
        while let Some((field, v)) = top.next()? {
            match (field, v) {
                (1, PbVal::Bytes(p)) => {
                    let (mut piece, mut score, mut ty) = (None, 0f32, 1i32);
                    let mut r = Pb { b: p, i: 0 };
                    while let Some((f, v)) = r.next()? {
                        match (f, v) {
                            (1, PbVal::Bytes(s)) => {
                                piece = Some(std::str::from_utf8(s).context("piece is not UTF-8")?.to_string())
                            }
                            (2, PbVal::Bytes(s)) if s.len() == 4 => score = f32::from_le_bytes(s.try_into().unwrap()),
                            (3, PbVal::Int(t)) if (1..=6).contains(&t) => ty = t as i32,
                            (3, PbVal::Int(t)) => bail!("piece {} has unknown type {t}", m.pieces.len()),
                            _ => {}
                        }
                    }
                    let piece = piece.with_context(|| format!("piece {} has no text", m.pieces.len()))?;
                    m.pieces.push((piece, score, ty));
                }
                (2, PbVal::Bytes(spec)) => {
                    let mut r = Pb { b: spec, i: 0 };
                    while let Some((f, v)) = r.next()? {
                        if let PbVal::Int(x) = v {
                            let x = x as i64 as i32 as i64;
                            match f {
                                40 => m.unk = x,
                                41 => m.bos = x,
                                42 => m.eos = x,
                                43 => m.pad = x,
                                _ => {}
                            }
                        }
                    }
                }
                (3, PbVal::Bytes(spec)) => {
                    let mut r = Pb { b: spec, i: 0 };
                    while let Some((f, v)) = r.next()? {
                        if let (3, PbVal::Int(x)) = (f, v) {
                            m.add_dummy_prefix = x != 0;
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            bail!("no pieces");
        }
        Ok(m)
    }

    /// Serializes the fields [`SpModel::parse`] reads, plus `model_type: BPE` and `byte_fallback`, which
    /// SentencePiece needs to load a Llama-style model.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push(v as u8 | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
            varint(out, field << 3 | wire);
        }
        fn bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
            key(out, field, 2);
            varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        let mut out = Vec::new();
        for (piece, score, ty) in &self.pieces {
            let mut p = Vec::new();
            bytes(&mut p, 1, piece.as_bytes());
            key(&mut p, 2, 5);
            p.extend_from_slice(&score.to_le_bytes());
            if *ty != NORMAL {
                key(&mut p, 3, 0);
                varint(&mut p, *ty as u64);
            }
            bytes(&mut out, 1, &p);
        }
        let mut t = Vec::new();
        key(&mut t, 3, 0);
        varint(&mut t, 2); // model_type = BPE
        key(&mut t, 35, 0);
        varint(&mut t, 1); // byte_fallback
        for (f, v) in [(40, self.unk), (41, self.bos), (42, self.eos), (43, self.pad)] {
            key(&mut t, f, 0);
            varint(&mut t, v as u64);
        }
        bytes(&mut out, 2, &t);
        let mut n = Vec::new();
        key(&mut n, 3, 0);
        varint(&mut n, self.add_dummy_prefix as u64);
        bytes(&mut out, 3, &n);
        out
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF → HF tokenizer files (export-hf)
// ---------------------------------------------------------------------------------------------------------------

/// `(file name, contents)` of the tokenizer files for a GGUF's vocabulary, plus the special ids for config.json.
pub struct HfTokenizerFiles {
    pub files: Vec<(String, Vec<u8>)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

pub fn hf_tokenizer_files(f: &GgufFile) -> Result<HfTokenizerFiles> {
    let path = f.path().display().to_string();
    let model = f.get_str("tokenizer.ggml.model")?.with_context(|| format!("{path}: no tokenizer.ggml.model"))?;
    let tokens = f
        .get_array("tokenizer.ggml.tokens")?
        .and_then(|a| a.as_strings())
        .with_context(|| format!("{path}: tokenizer.ggml.tokens is missing or not strings"))?;
    let n = tokens.len();
    let types: Vec<i64> = match f.get_array("tokenizer.ggml.token_type")? {
        Some(a) => a
            .to_i64_vec()
            .filter(|v| v.len() == n)
            .with_context(|| format!("{path}: tokenizer.ggml.token_type has the wrong length"))?,
        None => vec![NORMAL as i64; n],
    };
    let id = |k: &str| -> Result<Option<u32>> {
        Ok(f.get_u64(&format!("tokenizer.ggml.{k}_token_id"))?.filter(|&v| (v as usize) < n).map(|v| v as u32))
    };
    let (bos, eos, unk, pad) = (id("bos")?, id("eos")?, id("unknown")?, id("padding")?);
    let add_bos = f.get_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos = f.get_bool("tokenizer.ggml.add_eos_token")?;
    let text = |i: Option<u32>| i.map(|i| J::String(tokens[i as usize].clone())).unwrap_or(J::Null);

    let mut files = Vec::new();
    let mut cfg = Map::new();
    cfg.insert("bos_token".into(), text(bos));
    cfg.insert("eos_token".into(), text(eos));
    if unk.is_some() {
        cfg.insert("unk_token".into(), text(unk));
    }
    if pad.is_some() {
        cfg.insert("pad_token".into(), text(pad));
    }
    if let Some(b) = add_bos {
        cfg.insert("add_bos_token".into(), J::Bool(b));
    }
    if let Some(b) = add_eos {
        cfg.insert("add_eos_token".into(), J::Bool(b));
    }
    if let Some(t) = f.get_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), J::String(t.to_string()));
    }
    cfg.insert("model_max_length".into(), json!(1_000_000));
    let added: Vec<J> = (0..n)
        .filter(|&i| types[i] == CONTROL as i64 || types[i] == USER_DEFINED as i64)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == CONTROL as i64})
        })
        .collect();
    match model {
        "gpt2" => {
            let merges = f
                .get_array("tokenizer.ggml.merges")?
                .and_then(|a| a.as_strings())
                .with_context(|| format!("{path}: BPE vocabulary without tokenizer.ggml.merges"))?;
            let pre = f.get_str("tokenizer.ggml.pre")?;
            let ignore_merges =
                matches!(pre.unwrap_or("llama-bpe"), "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "default");
            let mut vocab = Map::new();
            for (i, t) in tokens.iter().enumerate() {
                if types[i] != UNUSED as i64 {
                    vocab.insert(t.clone(), json!(i));
                }
            }
            let post = match bos.filter(|_| add_bos == Some(true)) {
                Some(b) => json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": tokens[b as usize], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": tokens[b as usize], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": tokens[b as usize], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {tokens[b as usize].clone(): {"id": tokens[b as usize], "ids": [b], "tokens": [tokens[b as usize]]}}}),
                None => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
                }
            };
            let tj = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
                "pre_tokenizer": pre_tokenizer_json(pre)?,
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
            });
            files.push(("tokenizer.json".into(), serde_json::to_vec(&tj)?));
            cfg.insert("tokenizer_class".into(), J::String("PreTrainedTokenizerFast".into()));
        }
        "llama" => {
            let scores = match f.get_array("tokenizer.ggml.scores")? {
                Some(a) => a
                    .to_f32_vec()
                    .filter(|v| v.len() == n)
                    .with_context(|| format!("{path}: tokenizer.ggml.scores has the wrong length"))?,
                None => vec![0.0; n],
            };
            // Every token becomes a piece (padding and added tokens included, with their types), so a
            // re-conversion reproduces the GGUF vocabulary exactly.
            let sp = SpModel {
                pieces: (0..n).map(|i| (tokens[i].clone(), scores[i], types[i] as i32)).collect(),
                unk: unk.map_or(-1, |v| v as i64),
                bos: bos.map_or(-1, |v| v as i64),
                eos: eos.map_or(-1, |v| v as i64),
                pad: pad.map_or(-1, |v| v as i64),
                add_dummy_prefix: f.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
            };
            files.push(("tokenizer.model".into(), sp.to_bytes()));
            cfg.insert("tokenizer_class".into(), J::String("LlamaTokenizer".into()));
        }
        other => bail!("{path}: tokenizer.ggml.model '{other}' cannot be exported (gpt2 and llama can)"),
    }
    files.push(("tokenizer_config.json".into(), serde_json::to_vec_pretty(&J::Object(cfg))?));
    Ok(HfTokenizerFiles { files, bos, eos })
}
