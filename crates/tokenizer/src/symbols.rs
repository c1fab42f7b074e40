//! The linked list of symbols that llama.cpp's BPE and SentencePiece tokenizers both merge: each symbol is a byte
//! span of the text; merging absorbs the right neighbour into the left one.

pub(crate) struct Sym {
    pub start: usize,
    pub n: usize,
    pub prev: isize,
    pub next: isize,
}

/// One symbol per UTF-8 character of `text`.
pub(crate) fn split_chars(text: &str) -> Vec<Sym> {
    text.char_indices()
        .enumerate()
        .map(|(i, (start, c))| {
            let n = c.len_utf8();
            let next = if start + n == text.len() { -1 } else { i as isize + 1 };
            Sym { start, n, prev: i as isize - 1, next }
        })
        .collect()
}

/// Merges `r` into `l` if the queued pair (of byte length `size`) is still current; returns the new neighbours
/// `(l.prev, l.next)` whose pairs must be queued, or `None` for a stale pair.
pub(crate) fn merge(syms: &mut [Sym], l: usize, r: usize, size: usize) -> Option<(isize, isize)> {
    if syms[l].n == 0 || syms[r].n == 0 || syms[l].n + syms[r].n != size {
        return None;
    }
    syms[l].n += syms[r].n;
    syms[r].n = 0;
    let rn = syms[r].next;
    syms[l].next = rn;
    if rn >= 0 {
        syms[rn as usize].prev = l as isize;
    }
    Some((syms[l].prev, syms[l].next))
}
