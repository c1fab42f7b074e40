//! Guards the release binary's hot AVX2 kernels against silent de-inlining. Once, after an unrelated edit to
//! `avx2.rs`, LLVM stopped inlining a block-sum closure into the TQ2_0 decode kernel: an out-of-line call per row and
//! block made TQ2_0 generation ~30% slower while every test still passed (the results were the same bits). It was
//! found only by a benchmark pass. This test disassembles the `ternlm` binary that cargo built for the tests (same
//! profile as `cargo build --release`) and fails when a hot kernel calls anything other than a panic path.

use std::collections::BTreeMap;
use std::process::Command;

/// Kernels that run once per row, block or token in generation and prompt processing. Each is a
/// `#[target_feature]` function reached through a function pointer, so it stays a symbol of its own.
const HOT: &[&str] = &[
    "ternlm_kernels::avx2::i2s_clean_rows4::rows4",
    "ternlm_kernels::avx2::i2s_clean_tile2x4::tile",
    "ternlm_kernels::avx2::i2s_clean_kernels::one",
    "ternlm_kernels::avx2::i2s_clean_kernels::four",
    "ternlm_kernels::avx2::tq_rows4::tq1",
    "ternlm_kernels::avx2::tq_rows4::tq2",
    "ternlm_kernels::avx2::dot_tq1_0_avx2",
    "ternlm_kernels::avx2::dot_tq2_0_avx2",
    "ternlm_kernels::avx2::dot_q6_k_avx2",
    "ternlm_kernels::avx2::dot_q8_0_avx2",
    "ternlm_kernels::avx2::dot_f16w_f32a_avx2",
    "ternlm_kernels::avx2::quantize_i8_per_token",
    // The one-row kernels (decode) and one-row × four-token kernels (prompts) of the other types, e.g. Q4_K or Q5_0
    // models (one symbol name each for all the types).
    "ternlm_kernels::avx2::row_dot::f::inner",
    "ternlm_kernels::avx2::row_dot4::f::inner",
];

/// Direct call targets a hot kernel may have: the panic paths of its bounds checks and assertions.
fn is_panic_path(target: &str) -> bool {
    ["panic", "_fail", "core::slice::index", "unwrap_failed"].iter().any(|p| target.contains(p))
}

#[test]
#[cfg(target_arch = "x86_64")]
fn hot_kernels_make_no_out_of_line_calls() {
    if cfg!(debug_assertions) {
        eprintln!(
            "!!!!! SKIPPED: hot_kernels_make_no_out_of_line_calls checks release code generation; run it with \
             `cargo test --release` (as CI does) !!!!!"
        );
        return;
    }
    let bin = env!("CARGO_BIN_EXE_ternlm");
    let out = Command::new("objdump")
        .args(["-d", "-C", "--no-show-raw-insn", bin])
        .output()
        .unwrap_or_else(|e| panic!("running objdump (binutils) on {bin}: {e}"));
    assert!(out.status.success(), "objdump failed on {bin}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);

    // Function header lines look like `00000000005ab4e0 <ternlm_kernels::avx2::tq_rows4::tq2>:`; call lines like
    // `  5aba7a:\tcall   5ab4e0 <name>` (direct) or `call   *0x11fec0(%rip) ...` (through the GOT: the panic
    // functions of a position-independent binary).
    let mut calls: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")).map(|(_, n)| n) {
            current = HOT.iter().copied().find(|h| *h == name);
            if let Some(h) = current {
                calls.entry(h).or_default();
            }
            continue;
        }
        let Some(h) = current else { continue };
        let Some((_, ins)) = line.split_once('\t') else { continue };
        let ins = ins.trim();
        if !ins.starts_with("call") || ins.contains('*') {
            continue;
        }
        let target = ins.split_once('<').map_or(ins, |(_, t)| t.trim_end_matches('>'));
        if !is_panic_path(target) {
            calls.get_mut(h).unwrap().push(target.to_string());
        }
    }

    let missing: Vec<&str> = HOT.iter().copied().filter(|h| !calls.contains_key(h)).collect();
    assert!(
        missing.is_empty(),
        "hot kernels not found as symbols in {bin} (renamed? then update HOT in this test): {missing:?}"
    );
    let offenders: Vec<String> =
        calls.iter().filter(|(_, c)| !c.is_empty()).map(|(h, c)| format!("{h} calls {c:?}")).collect();
    assert!(
        offenders.is_empty(),
        "hot kernels call functions out of line (an inlining regression: check the helper or closure named, e.g. \
         replace std::array::from_fn with a plain loop):\n{}",
        offenders.join("\n")
    );
}
