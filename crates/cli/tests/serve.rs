//! `ternlm serve` against real clients on loopback: the official `openai` Python client, raw HTTP for the error
//! paths and disconnects, and headless Chromium for the web chat page. Uses SmolLM2-135M from
//! `scripts/fetch-models.sh smollm2`; needs python3 with `openai` and Debian's `chromium` (.ci/run installs both).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ternlm");
const CHAT_PROMPT: &str = "What is the capital of France?";
const COMPLETION_PROMPT: &str = "The capital of France is";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh smollm2", p.display());
    p
}

struct Server {
    child: Child,
    addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("-m")
            .arg(model())
            .args(["--port", "0", "-t", "1"])
            .args(extra)
            .env_remove("TERNLM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ternlm serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("ternlm serve did not start: {}", log.lock().unwrap())
        });
        Server { child, addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One request with `Connection: close`; returns (status, body with any chunked framing removed).
    fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut s = self.send(method, path, headers, body);
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // A server that answers before reading the whole body (413) closes with unread data, which the
                // kernel may turn into a reset after the answer arrived.
                Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{method} {path}: {e}"),
            }
        }
        parse_response(&raw)
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        // A body the server refuses early may not be read in full; that is the server's right.
        let _ = s.write_all(body);
        s
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.http("GET", "/metrics", &[], b"");
        assert_eq!(status, 200);
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// Polls a metric until `ok` holds.
    fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if ok(v) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{name} stayed at {v}; log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    if !chunked {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    (status, out)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// What `ternlm run` prints for a greedy generation (without the newline it adds at the end).
fn ternlm_run(prompt: &str, chat: bool, n: usize) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("-m").arg(model()).args(["-p", prompt, "-n", &n.to_string(), "--temp", "0", "--no-echo"]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "ternlm run failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn python(script: &str, args: &[&str]) -> serde_json::Value {
    let path = root().join("crates/cli/tests/support").join(script);
    let out = Command::new("python3").arg(&path).args(args).output().expect("running python3");
    assert!(
        out.status.success(),
        "{script} failed (python3 with the `openai` package and Debian's chromium are needed; .ci/run installs them):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn openai_python_client_gets_what_ternlm_run_prints() {
    let server = Server::start(&["-P", "2", "-c", "512"]);
    let r = python(
        "openai_client.py",
        &[&format!("{}/v1", server.url()), "SmolLM2-135M-Instruct.Q4_1", CHAT_PROMPT, COMPLETION_PROMPT, "32"],
    );
    let chat = ternlm_run(CHAT_PROMPT, true, 32);
    let completion = ternlm_run(COMPLETION_PROMPT, false, 32);
    assert!(!chat.is_empty() && !completion.is_empty());
    assert_eq!(r["chat"]["text"], chat.as_str(), "{r}");
    assert_eq!(r["chat"]["role"], "assistant");
    assert_eq!(r["chat"]["object"], "chat.completion");
    assert_eq!(r["chat_stream"]["text"], chat.as_str(), "{r}");
    assert_eq!(r["chat_stream"]["role"], "assistant");
    assert_eq!(r["chat"]["finish_reason"], r["chat_stream"]["finish_reason"]);
    assert_eq!(r["completion"]["text"], completion.as_str(), "{r}");
    assert_eq!(r["completion_stream"]["text"], completion.as_str(), "{r}");
    assert_eq!(r["completion"]["finish_reason"], "length", "32 tokens of a plain completion hit max_tokens");
    assert_eq!(r["completion_stream"]["finish_reason"], "length");
    assert!(r["completion_stream"]["chunks"].as_u64().unwrap() >= 10, "streamed piece by piece: {r}");
    // Usage: the same prompt both times; the second chat request reuses the first one's cached prompt.
    let (u1, u2) = (&r["chat"]["usage"], &r["chat_stream"]["usage"]);
    assert_eq!(u1["prompt_tokens"], u2["prompt_tokens"]);
    assert_eq!(u1["completion_tokens"], u2["completion_tokens"]);
    let p = u1["prompt_tokens"].as_u64().unwrap();
    assert!(p > 10, "{r}");
    assert_eq!(u1["total_tokens"].as_u64().unwrap(), p + u1["completion_tokens"].as_u64().unwrap());
    assert_eq!(u2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(), p - 1, "prefix reuse: {r}");
    assert_eq!(r["completion"]["usage"]["completion_tokens"], 32);
    assert_eq!(r["models"][0], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(r["unknown_model"]["status"], 404);
    assert_eq!(r["unknown_model"]["code"], "model_not_found");
}

#[test]
fn bad_requests_get_the_right_status_and_an_openai_error_body() {
    let server =
        Server::start(&["-P", "1", "-c", "256", "--api-key", "sekrit", "--max-queue", "1", "--max-body-bytes", "4096"]);
    let key = [("Authorization", "Bearer sekrit")];
    let chat = |body: &str, headers: &[(&str, &str)]| {
        let (status, text) = server.http("POST", "/v1/chat/completions", headers, body.as_bytes());
        (status, json(&text))
    };
    let ok = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"temperature":0}"#;

    let (s, e) = chat(ok, &[]);
    assert_eq!((s, e["error"]["type"].as_str()), (401, Some("authentication_error")), "{e}");
    let (s, _) = chat(ok, &[("Authorization", "Bearer wrong")]);
    assert_eq!(s, 401);
    let (s, e) = chat(ok, &key);
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["object"], "chat.completion");

    let (s, e) = chat(r#"{"messages": [{"role": "user", "content": "Hi"}"#, &key);
    assert_eq!((s, e["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{e}");
    let (s, e) = chat(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#, &key);
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("model_not_found")), "{e}");
    let long = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "word ".repeat(400));
    let (s, e) = chat(&long, &key);
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{e}");
    let (s, e) = chat(r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":100000}"#, &key);
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("max_tokens")), "{e}");
    let (s, e) = chat(r#"{"messages":[{"role":"user","content":"Hi"}],"temperature":-1}"#, &key);
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("temperature")), "{e}");
    let huge = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(10_000));
    let (s, e) = chat(&huge, &key);
    assert_eq!(s, 413, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("--max-body-bytes"));
    let (s, text) = server.http("GET", "/v1/nothing", &key, b"");
    assert_eq!((s, json(&text)["error"]["type"].as_str()), (404, Some("not_found_error")));
    let (s, text) = server.http("GET", "/health", &[], b"");
    assert_eq!((s, json(&text)["status"].as_str()), (200, Some("ok")));

    // One slot and a queue of one: a third concurrent request is refused with 429. The two long generations must
    // still be running when the third arrives, whatever the machine's speed: a server with room for 1,800 tokens
    // (200 finished within the test's polling on a fast run and let the third in); dropping them ends them early.
    drop(server);
    let server = Server::start(&["-P", "1", "-c", "2048", "--api-key", "sekrit", "--max-queue", "1"]);
    let long_gen = r#"{"prompt":"Once upon a time","max_tokens":1800,"ignore_eos":true,"stream":true,"temperature":0}"#;
    let a = server.send("POST", "/v1/completions", &key, long_gen.as_bytes());
    server.wait_metric("ternlm_slots_active", |v| v == 1.0);
    let b = server.send("POST", "/v1/completions", &key, long_gen.as_bytes());
    server.wait_metric("ternlm_queue_depth", |v| v == 1.0);
    let (s, text) = server.http("POST", "/v1/completions", &key, long_gen.as_bytes());
    let e = json(&text);
    assert_eq!((s, e["error"]["type"].as_str()), (429, Some("rate_limit_error")), "{e}");
    drop((a, b));
    server.wait_metric("ternlm_slots_active", |v| v == 0.0);
    assert_eq!(server.metric("ternlm_queue_depth"), 0.0);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let server = Server::start(&["-P", "1", "-c", "1024"]);
    let body = r#"{"prompt":"Once upon a time","max_tokens":900,"ignore_eos":true,"stream":true,"temperature":0}"#;
    let mut s = server.send("POST", "/v1/completions", &[], body.as_bytes());
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    server.wait_metric("ternlm_slots_active", |v| v == 0.0);
    let generated = server.metric("ternlm_generated_tokens_total");
    assert!(generated < 900.0, "the generation ran on after the client left ({generated} tokens)");
    assert_eq!(server.metric("ternlm_generations_total{reason=\"cancelled\"}"), 1.0);
    // The same for a non-streaming request whose client gives up while it runs.
    let s = server.send("POST", "/v1/completions", &[], body.replace("\"stream\":true", "\"stream\":false").as_bytes());
    server.wait_metric("ternlm_generated_tokens_total", |v| v >= generated + 4.0);
    drop(s);
    server.wait_metric("ternlm_slots_active", |v| v == 0.0);
    assert!(server.metric("ternlm_generated_tokens_total") < generated + 900.0);
    assert_eq!(server.metric("ternlm_generations_total{reason=\"cancelled\"}"), 2.0);
    // The only slot takes the next request.
    let (status, text) =
        server.http("POST", "/v1/completions", &[], br#"{"prompt":"Hello","max_tokens":4,"temperature":0}"#);
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["usage"]["completion_tokens"], 4);
}

#[test]
fn sigterm_lets_a_running_stream_finish_then_exits() {
    let mut server = Server::start(&["-P", "2", "-c", "256"]);
    let body = r#"{"prompt":"Once upon a time","max_tokens":40,"ignore_eos":true,"stream":true,"temperature":0}"#;
    let mut s = server.send("POST", "/v1/completions", &[], body.as_bytes());
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let mut raw = first.to_vec();
    raw.extend(rest);
    let (status, text) = parse_response(&raw);
    assert_eq!(status, 200);
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let t0 = Instant::now();
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log.lock().unwrap().contains("stopped"));
}

#[test]
fn web_chat_page_streams_an_answer_in_headless_chromium() {
    let server = Server::start(&["-P", "1", "-c", "512"]);
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-chat.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("{}/?temperature=0&max_tokens=32", server.url());
    let r = python("web_chat.py", &[&url, CHAT_PROMPT, shot.to_str().unwrap()]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["user"], CHAT_PROMPT);
    assert_eq!(r["reply"], ternlm_run(CHAT_PROMPT, true, 32).as_str(), "{r}");
    let states = r["states"].as_array().unwrap();
    assert!(states.len() >= 3, "the answer should appear piece by piece, saw lengths {states:?}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot {} looks wrong", shot.display());
    eprintln!("web chat screenshot: {}", shot.display());
}
