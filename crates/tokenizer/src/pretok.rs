//! llama.cpp's BPE pre-tokenizers: the regex sequence chosen by `tokenizer.ggml.pre`, applied the way
//! `unicode_regex_split` does (each regex splits every fragment; matches and the gaps between them both become
//! fragments).

use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Written with escapes: several of these code points change under Unicode normalization, which silently
/// breaks a literal copy of the class.
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[\u{41}-\u{5A}\u{61}-\u{7A}\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";

/// A named pre-tokenizer: the regexes llama.cpp applies, in order, and the vocabulary flags that come with it.
#[derive(Debug)]
pub struct PreTokenizer {
    pub name: String,
    regexes: Vec<Regex>,
    /// Whole pre-tokens found in the vocabulary skip BPE merges (llama3-style vocabularies).
    pub ignore_merges: bool,
    /// The pre-type implies a BOS token (llama3 family); the GGUF key `add_bos_token` still overrides it.
    pub default_add_bos: bool,
}

impl PreTokenizer {
    /// llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`; `None` (key absent) is llama.cpp's `default` fallback.
    pub fn from_name(name: Option<&str>) -> Result<PreTokenizer, String> {
        let name = name.unwrap_or("default");
        let (pats, ignore_merges, add_bos): (Vec<&str>, bool, bool) = match name {
            "default" => (vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false, false),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
                (vec![LLAMA3], true, true)
            }
            "dbrx" | "smaug-bpe" => (vec![LLAMA3], false, false),
            "deepseek-llm" => (
                vec!["[\r\n]", DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
                false,
                false,
            ),
            "deepseek-coder" => (vec!["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false, false),
            "falcon" => (vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"], false, false),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
                (vec![r"\p{N}", GPT2], false, false)
            }
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "jina-v1-en"
            | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "exaone4" | "a.x-4.0"
            | "mellum" => (vec![GPT2], false, false),
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => (vec![QWEN2], false, false),
            "glm4" | "chatglm-bpe" => (vec![LLAMA3], false, false),
            "tekken" => (
                vec![r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                true,
                true,
            ),
            "gpt-4o" | "llama4" => (
                vec![r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                false,
                false,
            ),
            "seed-coder" => (
                vec![r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
                false,
                false,
            ),
            "poro-chat" | "bloom" | "gpt3-finnish" => (vec![r" ?[^(\s|.,!?…。，、।۔،)]+"], false, false),
            "viking" => (vec![r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"], false, false),
            other => {
                return Err(format!(
                    "unknown pre-tokenizer '{other}' in tokenizer.ggml.pre (known: default, llama3/llama-bpe, qwen2, gpt-2, falcon, deepseek-llm, deepseek-coder, starcoder, smollm, mpt, ...)"
                ))
            }
        };
        let regexes = pats
            .into_iter()
            .map(|p| Regex::new(p).map_err(|e| format!("pre-tokenizer '{name}': bad regex: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { name: name.to_string(), regexes, ignore_merges, default_add_bos: add_bos })
    }

    /// Splits `text` into pre-tokens (byte ranges of `text`).
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut frags: Vec<(usize, usize)> = vec![(0, text.len())];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(frags.len() * 2);
            for &(s, e) in &frags {
                let frag = &text[s..e];
                let mut pos = 0;
                for m in re.find_iter(frag) {
                    // fancy-regex only errs when its backtrack limit is hit; keep the rest of the fragment whole then.
                    let Ok(m) = m else { break };
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > pos {
                        next.push((s + pos, s + m.start()));
                    }
                    next.push((s + m.start(), s + m.end()));
                    pos = m.end();
                }
                if pos < frag.len() {
                    next.push((s + pos, e));
                }
            }
            frags = next;
        }
        frags.into_iter().map(|(s, e)| &text[s..e]).collect()
    }
}

/// GPT-2's reversible byte → printable-char mapping used by byte-level BPE vocabularies.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_between_matches_are_kept() {
        let p = PreTokenizer::from_name(Some("gpt-2")).unwrap();
        assert_eq!(p.split("Hello world  !"), vec!["Hello", " world", " ", " !"]);
        let d = PreTokenizer::from_name(None).unwrap();
        assert_eq!(d.name, "default");
        assert_eq!(d.split("1234567"), vec!["123", "456", "7"]);
    }

    #[test]
    fn unknown_pre_is_an_error() {
        assert!(PreTokenizer::from_name(Some("nope")).unwrap_err().contains("nope"));
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
