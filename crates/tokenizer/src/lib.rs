//! Tokenizers that match llama.cpp token for token.
//!
//! [`Tokenizer::from_gguf`] builds the vocabulary from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE
//! (`gpt2`, with the pre-tokenizer named by `tokenizer.ggml.pre`, or llama.cpp's `default` rules when the key is
//! missing) and SentencePiece (`llama`, with byte fallback). The algorithms are ports of llama.cpp's
//! `llm_tokenizer_bpe` / `llm_tokenizer_spm`, including how special tokens split the text first.
//! [`HfTokenizer`] wraps the `tokenizers` crate for Hugging Face `tokenizer.json` files.

mod bpe;
mod hf;
pub mod pretok;
mod spm;
mod symbols;

pub use hf::HfTokenizer;
pub use pretok::PreTokenizer;

use std::collections::HashMap;
use ternlm_gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// SentencePiece (`tokenizer.ggml.model = "llama"`).
    Spm,
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(pub String);

pub type TokenId = u32;

pub struct Tokenizer {
    pub kind: VocabKind,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, TokenId>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub eot: Option<TokenId>,
    pub unk: Option<TokenId>,
    /// Tokens that end generation (EOS, EOT, EOM and llama.cpp's known end-of-turn texts).
    eog: Vec<TokenId>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    /// Control / user-defined / unknown tokens, longest first: the texts that split raw text before tokenizing.
    special_by_len: Vec<TokenId>,
    bpe: Option<bpe::Bpe>,
    byte_decoder: HashMap<char, u8>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({:?}, {} tokens)", self.kind, self.tokens.len())
    }
}

/// A piece of input: raw text to tokenize, or an already-recognised special token.
enum Fragment<'a> {
    Text(&'a str),
    Token(TokenId),
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys. `pre_override` replaces
    /// `tokenizer.ggml.pre` (e.g. `llama3` for BitNet 2B4T, whose file omits the key).
    pub fn from_gguf(f: &GgufFile, pre_override: Option<&str>) -> Result<Tokenizer, TokenizerError> {
        let e = |m: String| TokenizerError(format!("{}: {m}", f.path().display()));
        let ge = |err: ternlm_gguf::GgufError| TokenizerError(err.to_string());
        let model = f
            .get_str("tokenizer.ggml.model")
            .map_err(ge)?
            .ok_or_else(|| e("missing key 'tokenizer.ggml.model' (this GGUF has no vocabulary)".into()))?;
        let kind = match model {
            "llama" => VocabKind::Spm,
            "gpt2" => VocabKind::Bpe,
            other => return Err(e(format!("key 'tokenizer.ggml.model' is '{other}'; ternlm supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)"))),
        };
        let tokens = f
            .get_array("tokenizer.ggml.tokens")
            .map_err(ge)?
            .and_then(|a| a.as_strings())
            .ok_or_else(|| e("key 'tokenizer.ggml.tokens' is missing or not an array of strings".into()))?
            .to_vec();
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(e(format!("key 'tokenizer.ggml.tokens' has {n} entries")));
        }
        let scores = match f.get_array("tokenizer.ggml.scores").map_err(ge)? {
            Some(a) => a
                .to_f32_vec()
                .filter(|v| v.len() == n)
                .ok_or_else(|| e(format!("key 'tokenizer.ggml.scores' must be {n} numbers")))?,
            None => vec![0.0; n],
        };
        let types = match f.get_array("tokenizer.ggml.token_type").map_err(ge)? {
            Some(a) => a
                .to_i64_vec()
                .filter(|v| v.len() == n)
                .ok_or_else(|| e(format!("key 'tokenizer.ggml.token_type' must be {n} integers")))?
                .into_iter()
                .map(TokenType::from_i64)
                .collect(),
            None => vec![TokenType::Normal; n],
        };
        let id_key = |key: &str| -> Result<Option<TokenId>, TokenizerError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(-1) => Ok(None),
                    Some(id) if id >= 0 && (id as usize) < n => Ok(Some(id as TokenId)),
                    _ => Err(e(format!("key '{key}' is {}, expected a token id below {n}", v.summary()))),
                },
            }
        };
        let (mut bos, mut eos, mut unk) = match kind {
            VocabKind::Spm => (Some(1), Some(2), Some(0)),
            VocabKind::Bpe => (Some(11), Some(11), None),
        };
        let clamp = |t: Option<TokenId>| t.filter(|&t| (t as usize) < n);
        bos = clamp(bos);
        eos = clamp(eos);
        unk = clamp(unk);
        if f.get("tokenizer.ggml.bos_token_id").is_some() {
            bos = id_key("tokenizer.ggml.bos_token_id")?;
        }
        if f.get("tokenizer.ggml.eos_token_id").is_some() {
            eos = id_key("tokenizer.ggml.eos_token_id")?;
        }
        if f.get("tokenizer.ggml.unknown_token_id").is_some() {
            unk = id_key("tokenizer.ggml.unknown_token_id")?;
        }
        let eot_key = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;

        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as TokenId);
        }

        let (bpe, default_add_bos) = match kind {
            VocabKind::Bpe => {
                let pre = match pre_override {
                    Some(p) => Some(p),
                    None => f.get_str("tokenizer.ggml.pre").map_err(ge)?,
                };
                let pre = PreTokenizer::from_name(pre).map_err(e)?;
                let merges =
                    f.get_array("tokenizer.ggml.merges").map_err(ge)?.and_then(|a| a.as_strings()).ok_or_else(
                        || e("BPE vocabulary without 'tokenizer.ggml.merges' (expected an array of strings)".into()),
                    )?;
                let add_bos = pre.default_add_bos;
                (Some(bpe::Bpe::new(pre, merges, &token_to_id)), add_bos)
            }
            VocabKind::Spm => (None, true),
        };
        let add_bos = f.get_bool("tokenizer.ggml.add_bos_token").map_err(ge)?.unwrap_or(default_add_bos);
        let add_eos = f.get_bool("tokenizer.ggml.add_eos_token").map_err(ge)?.unwrap_or(false);
        let add_space_prefix =
            f.get_bool("tokenizer.ggml.add_space_prefix").map_err(ge)?.unwrap_or(kind == VocabKind::Spm);

        // llama.cpp finds end-of-turn tokens by their text when the file does not name them.
        const EOG_TEXTS: [&str; 12] = [
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "<|end_of_text|>",
            "<end_of_utterance>",
        ];
        let eot = eot_key.or_else(|| {
            [
                "<|eot_id|>",
                "<|im_end|>",
                "<|end|>",
                "<end_of_turn>",
                "<|endoftext|>",
                "<EOT>",
                "_<EOT>",
                "<|end_of_text|>",
            ]
            .iter()
            .find_map(|t| token_to_id.get(*t).copied())
        });
        let mut eog: Vec<TokenId> = EOG_TEXTS.iter().filter_map(|t| token_to_id.get(*t).copied()).collect();
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        let mut special_by_len: Vec<TokenId> = (0..n as TokenId)
            .filter(|&i| matches!(types[i as usize], TokenType::Control | TokenType::UserDefined | TokenType::Unknown))
            .filter(|&i| !tokens[i as usize].is_empty())
            .collect();
        special_by_len.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));

        let byte_decoder = pretok::byte_to_char_table().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Tokenizer {
            kind,
            tokens,
            scores,
            types,
            token_to_id,
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            special_by_len,
            bpe,
            byte_decoder,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_text(&self, id: TokenId) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    pub fn token_type(&self, id: TokenId) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.token_to_id.get(text).copied()
    }

    /// Every end-of-generation token id.
    pub fn eog_ids(&self) -> &[TokenId] {
        &self.eog
    }

    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    pub fn pre_tokenizer_name(&self) -> Option<&str> {
        self.bpe.as_ref().map(|b| b.pre.name.as_str())
    }

    /// Tokenizes like llama.cpp's `llama_tokenize(text, add_special, parse_special)`: with `add_special`, BOS/EOS
    /// are added as the vocabulary asks; with `parse_special`, control tokens written in the text are recognised
    /// (user-defined tokens always are).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let frags = self.partition_special(text, parse_special);
        let mut out = Vec::new();
        match self.kind {
            VocabKind::Spm => {
                let mut prev_special = true;
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                for f in frags {
                    match f {
                        Fragment::Text(t) => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            let s = s.replace(' ', "\u{2581}");
                            spm::tokenize(self, &s, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            VocabKind::Bpe => {
                let bpe = self.bpe.as_ref().expect("BPE vocabulary has merges");
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                for f in frags {
                    match f {
                        Fragment::Text(t) => bpe.tokenize(self, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
        }
        out
    }

    /// llama.cpp's `tokenizer_st_partition`: special-token texts cut the input before the tokenizer sees it.
    fn partition_special<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return vec![];
        }
        for &id in &self.special_by_len {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Fragment::Text(t) if t.contains(needle) => {
                        let mut rest = t;
                        while let Some(p) = rest.find(needle) {
                            if p > 0 {
                                next.push(Fragment::Text(&rest[..p]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[p + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for, as llama.cpp's `token_to_piece` gives them. Control tokens render only when
    /// `special` is set.
    pub fn token_to_piece(&self, id: TokenId, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else { return Vec::new() };
        let ty = self.types[id as usize];
        match ty {
            TokenType::Control | TokenType::Unknown if !special => {
                if self.kind == VocabKind::Spm && ty == TokenType::Unknown {
                    return "\u{2585}".as_bytes().to_vec();
                }
                Vec::new()
            }
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Byte if self.kind == VocabKind::Spm => {
                spm::byte_token_value(text).map(|b| vec![b]).unwrap_or_default()
            }
            _ => match self.kind {
                VocabKind::Spm => text.replace('\u{2581}', " ").into_bytes(),
                VocabKind::Bpe => {
                    let mut out = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match self.byte_decoder.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                    out
                }
            },
        }
    }

    /// Concatenated pieces, decoded lossily as UTF-8.
    pub fn decode(&self, ids: &[TokenId], special: bool) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_to_piece(i, special)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub(crate) fn score(&self, id: TokenId) -> f32 {
        self.scores[id as usize]
    }
}

/// Turns a stream of token pieces into valid UTF-8 text, holding back bytes of an unfinished character.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An invalid (not merely incomplete) sequence is emitted lossily so output never stalls.
                let cut = if e.error_len().is_some() { self.pending.len() } else { valid };
                let s = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
                self.pending.drain(..cut);
                s
            }
        }
    }

    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
