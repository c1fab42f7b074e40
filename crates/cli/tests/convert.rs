//! The `convert`, `export-hf` and `run -m HF_DIR` commands end to end, on bitnet.cpp's I2_S fixture.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ternlm");

fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn ternlm(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN).args(args).output().expect("run ternlm");
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "ternlm {args:?} failed:\n{se}");
    (so, se)
}

#[test]
fn export_dry_run_convert_and_run_a_directory() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-convert");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let fixture = shared().join("fixtures/models/tiny-b158-i2s.gguf");
    let hf = work.join("hf");
    let out = work.join("back.gguf");
    let (hf_s, out_s, fix_s) = (hf.to_str().unwrap(), out.to_str().unwrap(), fixture.to_str().unwrap());

    let (_, err) = ternlm(&["export-hf", fix_s, "-o", hf_s]);
    assert!(err.contains("14 packed ternary"), "{err}");

    let (list, err) = ternlm(&["convert", hf_s, "--type", "i2_s", "--no-pre", "--dry-run"]);
    assert!(
        err.contains("BitNetForCausalLM → bitnet-b1.58") && err.contains("weight_scale is mean|W| (multiply)"),
        "{err}"
    );
    assert!(list.contains("blk.1.ffn_down.weight") && list.contains("I2_S") && list.contains("unpacked"), "{list}");
    assert!(!out.exists(), "--dry-run writes nothing");
    let (auto, _) = ternlm(&["convert", hf_s, "--no-pre", "--dry-run"]);
    assert!(auto.contains("blk.0.attn_q.weight") && auto.contains("I2_S"), "--type auto is I2_S for BitNet: {auto}");

    ternlm(&["convert", hf_s, "--type", "i2_s", "--no-pre", "-o", out_s]);
    let prompt = "The capital of France is";
    let run = |m: &str| ternlm(&["run", "-m", m, "-p", prompt, "-n", "12", "--temp", "0", "--ignore-eos"]).0;
    let from_file = run(out_s);
    assert!(from_file.starts_with(prompt) && from_file.len() > prompt.len());
    // The directory converts in memory to the same model.
    assert_eq!(run(hf_s), from_file);
}

#[test]
fn convert_errors_name_the_problem() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-convert-err");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let out = Command::new(BIN).args(["convert", work.to_str().unwrap(), "-o", "x.gguf"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.contains("cannot read"), "{err}");
}
