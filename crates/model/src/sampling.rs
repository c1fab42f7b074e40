//! Token sampling with llama.cpp's default chain: repetition penalty → top-k → top-p → min-p → temperature →
//! draw. Temperature ≤ 0 is greedy (argmax, lowest id on ties). Deterministic for a given seed.

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }
}

/// SplitMix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from `logits` given the tokens so far (`history`, for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l <= 0.0 { *l * p.repeat_penalty } else { *l / p.repeat_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let mut cand = top_candidates(&logits, p.top_k);
        if p.top_p < 1.0 {
            let probs = softmax_of(&cand);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let max = cand[0].1;
            let threshold = max + (p.min_p as f64).ln() as f32;
            let keep = cand.iter().take_while(|c| c.1 >= threshold).count().max(1);
            cand.truncate(keep);
        }
        for c in cand.iter_mut() {
            c.1 /= p.temperature;
        }
        let probs = softmax_of(&cand);
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        cand.last().expect("at least one candidate").0
    }
}

/// The `top_k` best (id, logit) pairs (all of them when `top_k` is 0), by descending logit then ascending id.
/// With a top-k cut, a linear-time selection runs before the sort: sorting a 128k vocabulary for every token
/// costs milliseconds, which a server pays once per sequence per step.
fn top_candidates(logits: &[f32], top_k: usize) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    if top_k > 0 && top_k < cand.len() {
        cand.select_nth_unstable_by(top_k - 1, order);
        cand.truncate(top_k);
    }
    cand.sort_by(order);
    cand
}

/// Softmax of candidates sorted by descending logit.
fn softmax_of(cand: &[(u32, f32)]) -> Vec<f64> {
    let max = cand[0].1 as f64;
    let e: Vec<f64> = cand.iter().map(|c| (c.1 as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_selection_equals_full_sort_then_cut() {
        let mut rng = Rng::new(7);
        for case in 0..50 {
            let n = 1 + (rng.next_u64() % 3000) as usize;
            // Few distinct values, so ties are everywhere and the id tie-break matters.
            let logits: Vec<f32> = (0..n).map(|_| (rng.next_u64() % 13) as f32 * 0.5 - 3.0).collect();
            let mut full: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            full.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            for k in [0, 1, 2, 40, n.saturating_sub(1), n, n + 5] {
                let want = if k == 0 || k >= n { full.clone() } else { full[..k].to_vec() };
                assert_eq!(top_candidates(&logits, k), want, "case {case}, n {n}, k {k}");
            }
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_flip_choice() {
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..SamplingParams::greedy() });
        assert_eq!(s.sample(&[1.0, 1.5], &[1]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_deterministic() {
        let p = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[0.0, 5.0, 4.9], &[]), 1);
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // With min_p = 0.5, only tokens within ln(2) of the best logit survive.
        let logits = [10.0f32, 9.5, 0.0, -1.0];
        for seed in 0..50 {
            let mut s = Sampler::new(SamplingParams {
                seed,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.5,
                ..Default::default()
            });
            assert!(s.sample(&logits, &[]) < 2);
            let mut s = Sampler::new(SamplingParams {
                seed,
                temperature: 1.0,
                top_k: 0,
                top_p: 0.5,
                min_p: 0.0,
                ..Default::default()
            });
            assert_eq!(s.sample(&logits, &[]), 0);
        }
    }
}
