//! Byte-level BPE, ported from llama.cpp's `llm_tokenizer_bpe_session`.

use crate::pretok::{byte_to_char_table, PreTokenizer};
use crate::symbols::{merge, split_chars, Sym};
use crate::{TokenId, Tokenizer};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

pub(crate) struct Bpe {
    pub pre: PreTokenizer,
    /// Merge rank by (left id, right id) for merges whose sides are both tokens (all of them in real vocabs).
    ranks: HashMap<(TokenId, TokenId), u32>,
    /// Merges with a side that is not a token, keyed by the merge line "left right".
    ranks_by_text: HashMap<String, u32>,
    byte_chars: [char; 256],
}

impl Bpe {
    pub fn new(pre: PreTokenizer, merges: &[String], token_to_id: &HashMap<String, TokenId>) -> Bpe {
        let mut ranks = HashMap::with_capacity(merges.len());
        let mut ranks_by_text = HashMap::new();
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte; the first occurrence of a pair wins.
            let first = m.chars().next().map_or(0, char::len_utf8);
            let Some(pos) = m[first..].find(' ').map(|p| p + first) else { continue };
            let (l, r) = (&m[..pos], &m[pos + 1..]);
            match (token_to_id.get(l), token_to_id.get(r)) {
                (Some(&a), Some(&b)) => {
                    ranks.entry((a, b)).or_insert(rank as u32);
                }
                _ => {
                    ranks_by_text.entry(format!("{l} {r}")).or_insert(rank as u32);
                }
            }
        }
        Bpe { pre, ranks, ranks_by_text, byte_chars: byte_to_char_table() }
    }

    fn rank(&self, tok: &Tokenizer, l: &str, r: &str) -> Option<u32> {
        if let (Some(a), Some(b)) = (tok.token_id(l), tok.token_id(r)) {
            if let Some(&rank) = self.ranks.get(&(a, b)) {
                return Some(rank);
            }
        }
        if self.ranks_by_text.is_empty() {
            None
        } else {
            self.ranks_by_text.get(&format!("{l} {r}")).copied()
        }
    }

    pub fn tokenize(&self, tok: &Tokenizer, text: &str, out: &mut Vec<TokenId>) {
        let mut word = String::new();
        for piece in self.pre.split(text) {
            word.clear();
            for &b in piece.as_bytes() {
                word.push(self.byte_chars[b as usize]);
            }
            self.tokenize_word(tok, &word, out);
        }
    }

    fn tokenize_word(&self, tok: &Tokenizer, word: &str, out: &mut Vec<TokenId>) {
        if self.pre.ignore_merges {
            if let Some(id) = tok.token_id(word) {
                out.push(id);
                return;
            }
        }
        let mut syms = split_chars(word);
        // Min-heap on (rank, left index): llama.cpp's comparator pops the lowest rank, leftmost first.
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let text = |s: &Sym| &word[s.start..s.start + s.n];
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            if let Some(rank) = self.rank(tok, text(ls), text(rs)) {
                heap.push(Reverse((rank, l as usize, r as usize, ls.n + rs.n)));
            }
        };
        for i in 1..syms.len() {
            push(&mut heap, &syms, i as isize - 1, i as isize);
        }
        while let Some(Reverse((_, l, r, size))) = heap.pop() {
            let Some((lp, ln)) = merge(&mut syms, l, r, size) else { continue };
            push(&mut heap, &syms, lp, l as isize);
            push(&mut heap, &syms, l as isize, ln);
        }
        for s in syms.iter().filter(|s| s.n > 0) {
            let t = text(s);
            match tok.token_id(t) {
                Some(id) => out.push(id),
                None => {
                    // llama.cpp looks each byte up as a one-byte string and drops those it cannot find.
                    for &b in t.as_bytes() {
                        if let Some(id) = std::str::from_utf8(&[b]).ok().and_then(|s| tok.token_id(s)) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }
}
