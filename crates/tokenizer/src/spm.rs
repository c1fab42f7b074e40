//! SentencePiece (BPE-by-score with byte fallback), ported from llama.cpp's `llm_tokenizer_spm_session`.

use crate::symbols::{merge, split_chars, Sym};
use crate::{TokenId, Tokenizer};
use std::collections::{BinaryHeap, HashMap};

/// Max-heap entry: highest score first, then the leftmost pair.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

/// `<0xAB>` → 0xAB.
pub(crate) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

pub(crate) fn tokenize(tok: &Tokenizer, text: &str, out: &mut Vec<TokenId>) {
    let mut syms = split_chars(text);
    let mut heap = BinaryHeap::new();
    let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
    for i in 1..syms.len() {
        try_add(tok, text, &mut heap, &mut rev_merge, &syms, i as isize - 1, i as isize);
    }
    while let Some(b) = heap.pop() {
        let l = b.left;
        let Some((lp, ln)) = merge(&mut syms, l, b.right, b.size) else { continue };
        try_add(tok, text, &mut heap, &mut rev_merge, &syms, lp, l as isize);
        try_add(tok, text, &mut heap, &mut rev_merge, &syms, l as isize, ln);
    }
    let mut i: isize = if syms.is_empty() { -1 } else { 0 };
    while i >= 0 {
        let s = &syms[i as usize];
        resegment(tok, text, &syms, &rev_merge, s.start, s.n, out);
        i = s.next;
    }
}

fn try_add<'t>(
    tok: &Tokenizer,
    text: &'t str,
    heap: &mut BinaryHeap<Bigram>,
    rev: &mut HashMap<&'t str, (usize, usize)>,
    syms: &[Sym],
    l: isize,
    r: isize,
) {
    if l < 0 || r < 0 {
        return;
    }
    let (l, r) = (l as usize, r as usize);
    let s = &text[syms[l].start..syms[l].start + syms[l].n + syms[r].n];
    if let Some(id) = tok.token_id(s) {
        heap.push(Bigram { score: tok.score(id), left: l, right: r, size: s.len() });
        rev.insert(s, (l, r));
    }
}

fn resegment(
    tok: &Tokenizer,
    text: &str,
    syms: &[Sym],
    rev: &HashMap<&str, (usize, usize)>,
    start: usize,
    n: usize,
    out: &mut Vec<TokenId>,
) {
    let s = &text[start..start + n];
    if let Some(id) = tok.token_id(s) {
        out.push(id);
        return;
    }
    match rev.get(s) {
        Some(&(l, r)) => {
            resegment(tok, text, syms, rev, syms[l].start, syms[r].start - syms[l].start, out);
            let rs = syms[r].start;
            resegment(tok, text, syms, rev, rs, start + n - rs, out);
        }
        None => {
            for &b in s.as_bytes() {
                out.extend(byte_to_token(tok, b));
            }
        }
    }
}

/// llama.cpp's `byte_to_token` for SPM: the `<0xXX>` token, else the character itself, else UNK.
fn byte_to_token(tok: &Tokenizer, b: u8) -> Option<TokenId> {
    let hex = format!("<0x{b:02X}>");
    if let Some(id) = tok.token_id(&hex) {
        return Some(id);
    }
    std::str::from_utf8(&[b]).ok().and_then(|s| tok.token_id(s)).or(tok.unk)
}
