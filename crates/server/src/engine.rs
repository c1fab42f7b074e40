//! The scheduler: one thread owns the model, the KV cache and the matmul pool, and runs continuous batching.
//!
//! Every step builds one batch: one token for each sequence that is generating, then chunks of waiting prompts
//! up to `n_batch` tokens in all, so a long prompt is processed over several steps while the others keep
//! generating. Sequences join when a KV slot is free and leave as soon as they finish or their client goes away.
//! A new request takes the free slot whose cached tokens share the longest prefix with its prompt (a shared
//! system prompt, or the earlier turns of a chat), and only the rest of its prompt is computed.

use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Continuation, FinishReason, GenerateOptions, KvCache, Model};
use ternlm_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// KV slots: sequences decoded together.
    pub n_slots: usize,
    /// Context per slot, in tokens.
    pub n_ctx: usize,
    /// Tokens per forward pass (generating tokens plus prompt chunks).
    pub n_batch: usize,
    /// Requests allowed to wait for a slot; more are refused (HTTP 429).
    pub max_queue: usize,
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Token limit, sampling, stop strings, `ignore_eos` (`batch_size` is the engine's, not the job's).
    pub opts: GenerateOptions,
    /// Where text and the final summary go. When the receiver is dropped (the client went away), the job is
    /// cancelled at the next step and its slot freed.
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Done),
    Error(String),
}

#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values were already cached in the slot.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

struct State {
    waiting: VecDeque<Job>,
    /// No new jobs (SIGTERM received); running ones finish.
    draining: bool,
    /// Cancel everything now.
    cancel_all: bool,
    /// Leave the loop once idle.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
}

/// A handle to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// A sequence that holds a KV slot.
struct Active {
    job: Job,
    seq: usize,
    /// Prompt tokens whose keys/values are in the slot (prompt processing is done when this reaches its length).
    n_past: usize,
    cached: usize,
    cont: Continuation,
    /// Whether a sampled token waits to be fed (the sequence is generating).
    generating: bool,
}

impl Engine {
    pub fn start(
        model: Model,
        tok: Arc<Tokenizer>,
        pool: ThreadPool,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { waiting: VecDeque::new(), draining: false, cancel_all: false, stop: false }),
            wake: Condvar::new(),
            cfg,
            metrics,
        });
        shared.metrics.set_slots_total(cfg.n_slots);
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ternlm-engine".into())
            .spawn(move || {
                let kv = model.new_kv_cache(cfg.n_ctx, cfg.n_slots);
                Scheduler { shared: s2, model, tok, pool, kv, slots: (0..cfg.n_slots).map(|_| None).collect() }.run()
            })
            .expect("spawning the engine thread");
        Engine { shared, thread: Arc::new(Mutex::new(Some(handle))) }
    }

    pub fn config(&self) -> EngineConfig {
        self.shared.cfg
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let mut st = self.shared.state.lock().unwrap();
        if st.draining || st.stop {
            return Err(SubmitError::ShuttingDown);
        }
        if st.waiting.len() >= self.shared.cfg.max_queue {
            return Err(SubmitError::QueueFull);
        }
        st.waiting.push_back(job);
        self.shared.metrics.set_queue_depth(st.waiting.len());
        self.shared.wake.notify_one();
        Ok(())
    }

    pub fn is_draining(&self) -> bool {
        self.shared.state.lock().unwrap().draining
    }

    /// Refuses new jobs from now on; running and queued ones go on.
    pub fn drain(&self) {
        self.shared.state.lock().unwrap().draining = true;
        self.shared.wake.notify_one();
    }

    /// Ends every queued and running job now with an error event.
    pub fn cancel_all(&self) {
        self.shared.state.lock().unwrap().cancel_all = true;
        self.shared.wake.notify_one();
    }

    /// Stops the thread once nothing is running, and waits for it.
    pub fn stop(&self) {
        {
            let mut st = self.shared.state.lock().unwrap();
            st.draining = true;
            st.stop = true;
        }
        self.shared.wake.notify_one();
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

struct Scheduler {
    shared: Arc<Shared>,
    model: Model,
    tok: Arc<Tokenizer>,
    pool: ThreadPool,
    kv: KvCache,
    slots: Vec<Option<Active>>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.drop_cancelled();
            if let Err(e) = self.step() {
                let msg = format!("{e:#}");
                eprintln!("ternlm serve: forward pass failed: {msg}");
                for i in 0..self.slots.len() {
                    if let Some(a) = self.slots[i].take() {
                        let _ = a.job.events.send(Event::Error(msg.clone()));
                        self.kv.truncate(a.seq, 0);
                        self.shared.metrics.finished("error");
                    }
                }
            }
            self.shared.metrics.set_slots_active(self.slots.iter().flatten().count());
        }
    }

    /// Waits for work and moves waiting jobs into free slots. Returns false when the engine should stop.
    fn admit(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut st = shared.state.lock().unwrap();
        loop {
            if st.cancel_all {
                st.cancel_all = false;
                for job in st.waiting.drain(..) {
                    let _ = job.events.send(Event::Error("the server is shutting down".into()));
                    shared.metrics.finished("cancelled");
                }
                for slot in self.slots.iter_mut() {
                    if let Some(a) = slot.take() {
                        let _ = a.job.events.send(Event::Error("the server is shutting down".into()));
                        shared.metrics.finished("cancelled");
                    }
                }
            }
            let busy = self.slots.iter().any(Option::is_some);
            if busy || !st.waiting.is_empty() {
                break;
            }
            shared.metrics.set_slots_active(0);
            if st.stop {
                return false;
            }
            st = shared.wake.wait(st).unwrap();
        }
        while !st.waiting.is_empty() {
            let free: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect();
            if free.is_empty() {
                break;
            }
            let job = st.waiting.pop_front().unwrap();
            if job.events.is_closed() {
                shared.metrics.finished("cancelled");
                continue;
            }
            // The free slot that already holds the longest prefix of this prompt.
            let seq = *free.iter().max_by_key(|&&s| (self.kv.common_prefix(s, &job.prompt), usize::MAX - s)).unwrap();
            let cached = self.kv.reuse_prefix(seq, &job.prompt);
            let cont = Continuation::new(&job.prompt, &job.opts);
            self.slots[seq] = Some(Active { job, seq, n_past: cached, cached, cont, generating: false });
        }
        shared.metrics.set_queue_depth(st.waiting.len());
        true
    }

    fn drop_cancelled(&mut self) {
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(|a| a.job.events.is_closed()) {
                *slot = None;
                self.shared.metrics.finished("cancelled");
            }
        }
    }

    fn step(&mut self) -> anyhow::Result<()> {
        let n_batch = self.shared.cfg.n_batch.max(1);
        let mut batch = Vec::new();
        // The sequence of each batch row that returns logits, in batch order.
        let mut rows = Vec::new();
        // Generating sequences first: each needs one token per step.
        for a in self.slots.iter().flatten().filter(|a| a.generating) {
            batch.push(BatchToken { token: a.cont.last_token(), pos: a.cont.next_pos(), seq: a.seq, logits: true });
            rows.push(a.seq);
        }
        let n_decode = batch.len();
        // Then prompt chunks, oldest request first, in what is left of the batch.
        let mut order: Vec<(Instant, usize)> = self
            .slots
            .iter()
            .flatten()
            .filter(|a| !a.generating && a.n_past < a.job.prompt.len())
            .map(|a| (a.job.submitted, a.seq))
            .collect();
        order.sort();
        let mut prompt_progress = Vec::new();
        for (_, seq) in order {
            let room = n_batch.saturating_sub(batch.len());
            if room == 0 {
                break;
            }
            let a = self.slots[seq].as_ref().unwrap();
            let end = (a.n_past + room).min(a.job.prompt.len());
            for pos in a.n_past..end {
                let last = pos + 1 == a.job.prompt.len();
                batch.push(BatchToken { token: a.job.prompt[pos], pos, seq, logits: last });
                if last {
                    rows.push(seq);
                }
            }
            prompt_progress.push((seq, end));
        }
        if batch.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut logits = self.model.forward(&batch, &mut self.kv, &self.pool)?;
        for (seq, end) in prompt_progress {
            self.slots[seq].as_mut().unwrap().n_past = end;
        }
        let n_vocab = self.model.cfg.n_vocab;
        for (seq, l) in rows.into_iter().zip(logits.chunks_exact_mut(n_vocab)) {
            if let Some(finish) = self.sample(seq, l) {
                self.finish(seq, finish);
            }
        }
        self.shared.metrics.step(batch.len() - n_decode, t0.elapsed());
        Ok(())
    }

    /// Samples the next token of `seq`, streams its text and says whether the sequence is finished.
    fn sample(&mut self, seq: usize, logits: &mut [f32]) -> Option<FinishReason> {
        let n_ctx = self.kv.n_ctx;
        let a = self.slots[seq].as_mut().unwrap();
        if !a.generating {
            self.shared.metrics.first_token(a.job.submitted.elapsed());
        }
        let before = a.cont.generated().len();
        let (text, finish) = a.cont.accept(&self.tok, logits, n_ctx);
        self.shared.metrics.generated((a.cont.generated().len() - before) as u64);
        if !text.is_empty() && a.job.events.send(Event::Text(text)).is_err() {
            return Some(FinishReason::Cancelled);
        }
        a.generating = finish.is_none();
        finish
    }

    fn finish(&mut self, seq: usize, finish: FinishReason) {
        let mut a = self.slots[seq].take().unwrap();
        if finish == FinishReason::Cancelled {
            self.shared.metrics.finished("cancelled");
            return;
        }
        // The slot keeps the tokens it computed (prompt and reply) for prefix reuse by the next request.
        let rest = a.cont.flush();
        if !rest.is_empty() {
            let _ = a.job.events.send(Event::Text(rest));
        }
        let done = Done {
            finish,
            prompt_tokens: a.job.prompt.len(),
            cached_tokens: a.cached,
            completion_tokens: a.cont.generated().len(),
        };
        self.shared.metrics.request_tokens(done.prompt_tokens, done.cached_tokens);
        self.shared.metrics.finished(match finish {
            FinishReason::Stop => "stop",
            _ => "length",
        });
        let _ = a.job.events.send(Event::Done(done));
    }
}
