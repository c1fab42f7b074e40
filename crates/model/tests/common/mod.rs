//! Locating the shared fixtures and the models that scripts/fetch-models.sh installs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use ternlm_gguf::GgufFile;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED").map(PathBuf::from).unwrap_or_else(|| root().join("../shared"))
}

/// Opens `models/<file>`. A missing model fails the test, unless TERNLM_SKIP_MODEL_TESTS=1, in which case a loud
/// notice is printed and `None` returned.
pub fn model_file(file: &str, fetch_name: &str) -> Option<Arc<GgufFile>> {
    let dir = std::env::var_os("TERNLM_MODELS").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let p = dir.join(file);
    if !p.exists() {
        if std::env::var("TERNLM_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1") {
            eprintln!(
                "\n*** SKIPPED: {} is missing and TERNLM_SKIP_MODEL_TESTS=1 — its checks did NOT run ***\n",
                p.display()
            );
            return None;
        }
        panic!(
            "{} is missing: run scripts/fetch-models.sh {fetch_name} (or set TERNLM_SKIP_MODEL_TESTS=1 to skip loudly)",
            p.display()
        );
    }
    Some(Arc::new(GgufFile::open(&p).unwrap_or_else(|e| panic!("{e}"))))
}
