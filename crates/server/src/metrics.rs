//! Counters and gauges for `GET /metrics`, in Prometheus' text exposition format.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Window over which `ternlm_generation_tokens_per_second` is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Metrics {
    /// (route, status) → count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// finish reason → count.
    finished: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    prompt_tokens_cached: AtomicU64,
    prompt_tokens_computed: AtomicU64,
    generated_tokens: AtomicU64,
    forward_passes: AtomicU64,
    busy_nanos: AtomicU64,
    queue_depth: AtomicU64,
    slots_active: AtomicU64,
    slots_total: AtomicU64,
    ttft: Mutex<Histogram>,
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *self.requests.lock().unwrap().entry((route, status)).or_default() += 1;
    }

    pub(crate) fn finished(&self, reason: &'static str) {
        *self.finished.lock().unwrap().entry(reason).or_default() += 1;
    }

    pub(crate) fn request_tokens(&self, prompt: usize, cached: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Relaxed);
        self.prompt_tokens_cached.fetch_add(cached as u64, Relaxed);
    }

    pub(crate) fn generated(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.generated_tokens.fetch_add(n, Relaxed);
        let now = Instant::now();
        let mut r = self.recent.lock().unwrap();
        r.push_back((now, n));
        while r.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            r.pop_front();
        }
    }

    pub(crate) fn step(&self, prompt_tokens: usize, took: Duration) {
        self.prompt_tokens_computed.fetch_add(prompt_tokens as u64, Relaxed);
        self.forward_passes.fetch_add(1, Relaxed);
        self.busy_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub(crate) fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        let mut h = self.ttft.lock().unwrap();
        for (i, &b) in TTFT_BUCKETS.iter().enumerate() {
            if s <= b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    pub(crate) fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Relaxed);
    }

    pub(crate) fn set_slots_active(&self, n: usize) {
        self.slots_active.store(n as u64, Relaxed);
    }

    pub(crate) fn set_slots_total(&self, n: usize) {
        self.slots_total.store(n as u64, Relaxed);
    }

    pub fn slots_active(&self) -> u64 {
        self.slots_active.load(Relaxed)
    }

    /// Generated tokens per second over the last few seconds.
    fn recent_rate(&self) -> f64 {
        let now = Instant::now();
        let r = self.recent.lock().unwrap();
        let n: u64 = r.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, n)| n).sum();
        match r.front() {
            Some((t0, _)) => n as f64 / now.duration_since(*t0).as_secs_f64().clamp(1.0, RATE_WINDOW.as_secs_f64()),
            None => 0.0,
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let plain = |v: String| vec![(String::new(), v)];
        let reqs = self.requests.lock().unwrap().clone();
        metric(
            "ternlm_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
            reqs.iter().map(|((r, c), n)| (format!("{{route=\"{r}\",status=\"{c}\"}}"), n.to_string())).collect(),
        );
        let fin = self.finished.lock().unwrap().clone();
        metric(
            "ternlm_generations_total",
            "counter",
            "Generations ended, by how they ended (stop, length, cancelled, error).",
            fin.iter().map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n.to_string())).collect(),
        );
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "ternlm_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished requests.",
            plain(c(&self.prompt_tokens)),
        );
        metric(
            "ternlm_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a slot's cache instead of being computed.",
            plain(c(&self.prompt_tokens_cached)),
        );
        metric(
            "ternlm_prompt_tokens_computed_total",
            "counter",
            "Prompt tokens run through the model.",
            plain(c(&self.prompt_tokens_computed)),
        );
        metric("ternlm_generated_tokens_total", "counter", "Tokens generated.", plain(c(&self.generated_tokens)));
        metric("ternlm_forward_passes_total", "counter", "Batched forward passes run.", plain(c(&self.forward_passes)));
        metric(
            "ternlm_busy_seconds_total",
            "counter",
            "Time spent in forward passes.",
            plain(format!("{:.6}", self.busy_nanos.load(Relaxed) as f64 * 1e-9)),
        );
        metric(
            "ternlm_generation_tokens_per_second",
            "gauge",
            "Tokens generated per second, all streams together, over the last 10 s.",
            plain(format!("{:.3}", self.recent_rate())),
        );
        metric("ternlm_queue_depth", "gauge", "Requests waiting for a slot.", plain(c(&self.queue_depth)));
        metric("ternlm_slots_active", "gauge", "Slots running a request.", plain(c(&self.slots_active)));
        metric("ternlm_slots_total", "gauge", "Slots (sequences decoded together).", plain(c(&self.slots_total)));
        let h = self.ttft.lock().unwrap();
        let mut lines: Vec<(String, String)> =
            TTFT_BUCKETS.iter().zip(h.counts).map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string())).collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
        lines.push(("_sum".into(), format!("{:.6}", h.sum)));
        lines.push(("_count".into(), h.count.to_string()));
        metric(
            "ternlm_time_to_first_token_seconds",
            "histogram",
            "From request arrival to its first generated token.",
            lines,
        );
        s
    }
}
