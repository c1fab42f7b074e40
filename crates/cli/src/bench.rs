//! `ternlm bench`: llama-bench-style measurements. For each thread count: prompt processing (one batch of
//! `n_prompt` tokens from an empty cache) and generation (`n_gen` single-token decodes from an empty cache), each
//! repeated, reported as mean ± stddev (llama-bench's fields) and median; plus load time, peak RSS, weight bytes read
//! per generated token, the achieved read bandwidth, and the machine's own read bandwidth from a short probe taken
//! before every generation repetition, so every generation result states its share of the memory roofline as
//! measured at that moment.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Model};

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF model file
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Prompt lengths to test (comma-separated; 0 skips prompt tests)
    #[arg(short = 'p', long = "n-prompt", default_value = "128", value_delimiter = ',')]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 skips generation tests)
    #[arg(short = 'n', long = "n-gen", default_value = "128", value_delimiter = ',')]
    pub n_gen: Vec<usize>,
    /// Thread counts (comma-separated)
    #[arg(short = 't', long, default_value = "2", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions per test
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// One JSON array of records instead of the table
    #[arg(long)]
    pub json: bool,
    /// Skip the memory-bandwidth probe
    #[arg(long)]
    pub no_probe: bool,
    /// Re-quantize the output head at load (q8_0, q6_k, f16)
    #[arg(long)]
    pub head_type: Option<String>,
    /// Copy the model into memory (transparent huge pages where the OS allows) instead of mapping the file: a few
    /// percent faster generation; the whole file stays resident (--head-type keeps the old head's pages)
    #[arg(long)]
    pub no_mmap: bool,
}

#[derive(Debug)]
struct Record {
    n_prompt: usize,
    n_gen: usize,
    n_threads: usize,
    samples: Vec<f64>,
    /// Generation only: the probed bandwidth just before each repetition (same order as `samples`).
    probes: Vec<f64>,
}

impl Record {
    /// Median over repetitions of each one's achieved bandwidth over the bandwidth probed just before it: the
    /// machine's bandwidth drifts by ±10% within minutes here, so only ratios taken at the same moment are stable.
    fn roofline_pct(&self, bytes_per_token: u64) -> Option<f64> {
        (!self.probes.is_empty()).then(|| {
            let r: Vec<f64> = self
                .samples
                .iter()
                .zip(&self.probes)
                .map(|(ts, p)| 100.0 * bytes_per_token as f64 * ts / 1e9 / p)
                .collect();
            median(&r)
        })
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The read-bandwidth probe: a buffer well past the last-level cache that every thread of a pool sums its share
/// of. Generation reads each weight once per token, so `weight bytes per token × tokens/s` over the probe's
/// figure is the share of the memory roofline a run reaches.
pub struct BandwidthProbe {
    buf: Vec<u64>,
}

impl BandwidthProbe {
    /// 256 MiB: eight times this machine's 32 MiB L3, and short to read (~10 ms at 25 GB/s), so a probe can run
    /// next to every generation repetition.
    pub const BYTES: usize = 256 << 20;

    pub fn new() -> Self {
        BandwidthProbe { buf: (0..(Self::BYTES / 8) as u64).collect() }
    }

    /// GB/s, best of `passes` reads of the whole buffer.
    pub fn measure(&self, pool: &ThreadPool, passes: usize) -> f64 {
        let (buf, n) = (&self.buf, self.buf.len());
        let chunks = pool.n_threads() * 8;
        let per = n.div_ceil(chunks);
        let sink = std::sync::atomic::AtomicU64::new(0);
        let mut best = 0f64;
        for _ in 0..passes {
            let t = Instant::now();
            pool.run(chunks, &|c| {
                let s = &buf[(c * per).min(n)..((c + 1) * per).min(n)];
                sink.fetch_add(ternlm_kernels::sum_u64(s), std::sync::atomic::Ordering::Relaxed);
            });
            best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        std::hint::black_box(sink.into_inner());
        best
    }
}

impl Default for BandwidthProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// Probe passes before each generation repetition (best of these is that repetition's roofline).
const PROBE_PASSES: usize = 3;

pub fn bench(a: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let file = Arc::new(crate::commands::open_model(&a.model, a.no_mmap)?);
    let mut model = Model::from_gguf(file)?;
    if let Some(h) = &a.head_type {
        crate::commands::apply_head_type(
            &mut model,
            h,
            &ThreadPool::new(a.threads.iter().copied().max().unwrap_or(1)),
        )?;
    }
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let bpt = model.weight_bytes_per_token();
    let n_vocab = model.cfg.n_vocab as u32;
    let max_ctx = a.n_prompt.iter().chain(&a.n_gen).copied().max().unwrap_or(1).max(1);
    let mut kv = model.new_kv_cache(max_ctx + 1, 1);
    let mut records = Vec::new();
    // Resident for the whole run, so its bytes are subtracted from the peak RSS exactly.
    let probe = (!a.no_probe).then(BandwidthProbe::new);
    for &threads in &a.threads {
        let pool = ThreadPool::new(threads.max(1));
        // A fixed pseudo-random token sequence (the content does not change the cost).
        let tokens: Vec<u32> = (0..max_ctx as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % n_vocab).collect();
        // Warm-up: touches every weight page once.
        model.forward(&[BatchToken { token: tokens[0], pos: 0, seq: 0, logits: true }], &mut kv, &pool)?;
        for &np in a.n_prompt.iter().filter(|&&n| n > 0) {
            let mut samples = Vec::new();
            for _ in 0..a.reps {
                kv.truncate(0, 0);
                let batch: Vec<BatchToken> = tokens[..np]
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: i + 1 == np })
                    .collect();
                let t = Instant::now();
                model.forward(&batch, &mut kv, &pool)?;
                samples.push(np as f64 / t.elapsed().as_secs_f64());
            }
            records.push(Record { n_prompt: np, n_gen: 0, n_threads: threads, samples, probes: Vec::new() });
        }
        for &ng in a.n_gen.iter().filter(|&&n| n > 0) {
            let (mut samples, mut probes) = (Vec::new(), Vec::new());
            for _ in 0..a.reps {
                if let Some(p) = &probe {
                    probes.push(p.measure(&pool, PROBE_PASSES));
                }
                kv.truncate(0, 0);
                let t = Instant::now();
                for (i, &tok) in tokens[..ng].iter().enumerate() {
                    model.forward(&[BatchToken { token: tok, pos: i, seq: 0, logits: true }], &mut kv, &pool)?;
                }
                samples.push(ng as f64 / t.elapsed().as_secs_f64());
            }
            records.push(Record { n_prompt: 0, n_gen: ng, n_threads: threads, samples, probes });
        }
    }
    // The model's peak: the probe buffer was resident throughout, written in full.
    let rss = peak_rss().map(|b| b.saturating_sub(if probe.is_some() { BandwidthProbe::BYTES as u64 } else { 0 }));
    let name = a.model.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    let size = std::fs::metadata(&a.model).with_context(|| a.model.display().to_string())?.len();
    if a.json {
        let out: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let (avg, sd) = mean_std(&r.samples);
                let gbps = (r.n_gen > 0).then(|| bpt as f64 * median(&r.samples) / 1e9);
                let probe = (!r.probes.is_empty()).then(|| median(&r.probes));
                serde_json::json!({
                    "model_filename": name,
                    "model_size": size,
                    "model_type": model.cfg.arch,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_threads": r.n_threads,
                    "avg_ts": avg,
                    "stddev_ts": sd,
                    "samples_ts": r.samples,
                    "median_ts": median(&r.samples),
                    "load_ms": load_ms,
                    "peak_rss_bytes": rss,
                    "weight_bytes_per_token": bpt,
                    "achieved_gbps": gbps,
                    "probe_gbps": probe,
                    "probe_samples_gbps": r.probes,
                    "roofline_pct": r.roofline_pct(bpt),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model: {name} ({:.2} GB, {}), load {:.0} ms, weights read per token {:.3} GB, peak RSS {}",
        size as f64 / 1e9,
        model.cfg.arch,
        load_ms,
        bpt as f64 / 1e9,
        rss.map_or("?".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
    );
    println!("| threads | test | t/s (mean ± sd) | median t/s | GB/s | probe GB/s (min..max) | % of probe |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for r in &records {
        let (avg, sd) = mean_std(&r.samples);
        let med = median(&r.samples);
        let test = if r.n_gen > 0 { format!("tg{}", r.n_gen) } else { format!("pp{}", r.n_prompt) };
        let gbps = if r.n_gen > 0 { format!("{:.1}", bpt as f64 * med / 1e9) } else { "-".into() };
        let probe = if r.probes.is_empty() {
            "-".into()
        } else {
            let (lo, hi) = r.probes.iter().fold((f64::MAX, 0f64), |(l, h), &p| (l.min(p), h.max(p)));
            format!("{:.1} ({lo:.1}..{hi:.1})", median(&r.probes))
        };
        let pct = r.roofline_pct(bpt).map_or("-".into(), |p| format!("{p:.0}%"));
        println!("| {} | {test} | {avg:.2} ± {sd:.2} | {med:.2} | {gbps} | {probe} | {pct} |", r.n_threads);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12 && (s - 1.2909944).abs() < 1e-6);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// End to end on a tiny generated model: every test runs and the bytes-per-token figure covers the weights.
    #[test]
    fn bench_runs_on_a_generated_model() {
        use ternlm_gguf::GgmlType;
        use ternlm_model::generator::{write_random_model, GenSpec};
        let vocab = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-bpe.gguf");
        let path = std::env::temp_dir().join(format!("ternlm-bench-{}.gguf", std::process::id()));
        write_random_model(&GenSpec::tiny(GgmlType::I2_S, GgmlType::Q8_0), &vocab, &path).unwrap();
        let model = Model::from_gguf(Arc::new(ternlm_gguf::GgufFile::open(&path).unwrap())).unwrap();
        // Tied head: every tensor is read once per token, plus one embedding row.
        let tensor_bytes: u64 = model.file.tensors().iter().map(|t| t.size).sum();
        let row = model.file.tensor_info("token_embd.weight").unwrap().size / 128256;
        assert_eq!(model.weight_bytes_per_token(), tensor_bytes + row);
        let args = BenchArgs {
            model: path.clone(),
            n_prompt: vec![16],
            n_gen: vec![4],
            threads: vec![1, 2],
            reps: 2,
            json: true,
            no_probe: false,
            head_type: Some("f16".into()),
            no_mmap: true, // the resident load path end to end (mapped files are what every other test opens)
        };
        bench(args).unwrap();
        std::fs::remove_file(&path).ok();
    }

    /// Each repetition is held against the probe taken just before it, and the median of those ratios is reported.
    #[test]
    fn roofline_pairs_each_repetition_with_its_probe() {
        let r = Record {
            n_prompt: 0,
            n_gen: 8,
            n_threads: 2,
            samples: vec![10.0, 20.0, 30.0],
            probes: vec![2.0, 5.0, 3.0],
        };
        // 1e8 bytes per token: 1, 2 and 3 GB/s against 2, 5 and 3 GB/s probed -> 50%, 40%, 100%.
        assert!((r.roofline_pct(100_000_000).unwrap() - 50.0).abs() < 1e-9);
        let pp = Record { n_prompt: 8, n_gen: 0, n_threads: 2, samples: vec![1.0], probes: vec![] };
        assert_eq!(pp.roofline_pct(100_000_000), None);
    }

    #[test]
    fn probe_measures_something() {
        let g = BandwidthProbe::new().measure(&ThreadPool::new(1), 1);
        assert!(g > 0.1 && g < 10_000.0, "{g}");
    }
}
