//! `convert` writes I2_S exactly as bitnet.cpp's quantizer does. The fixture `tiny-b158-i2s.gguf` was made by
//! bitnet.cpp from known ternary weights (codes × an f16-exact absmean scale, see its README). We rebuild those
//! weights as an HF packed checkpoint (uint8 + weight_scale, 2B4T's layout), convert it, and compare every I2_S
//! tensor byte for byte: the 2-bit codes and the f32 scale. The remaining 28 tail bytes are uninitialised memory
//! in bitnet.cpp's output (its README), which no writer can reproduce; ternlm writes zeros there.

mod common;

use common::*;
use safetensors::Dtype;
use serde_json::json;
use ternlm_convert::ternary::{decode_ternary, Ternary};
use ternlm_convert::{parse_type, ConvertOptions, HfCheckpoint, PreChoice};
use ternlm_gguf::{GgmlType, GgufFile};

fn fixture() -> GgufFile {
    GgufFile::open(shared().join("fixtures/models/tiny-b158-i2s.gguf")).unwrap()
}

/// HF name of a fixture tensor (2B4T naming).
fn hf_name(gguf: &str) -> String {
    let map = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_sub_norm", "self_attn.attn_sub_norm"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("ffn_sub_norm", "mlp.ffn_sub_norm"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").unwrap();
            let (l, t) = rest.split_once('.').unwrap();
            let t = t.strip_suffix(".weight").unwrap();
            format!("model.layers.{l}.{}.weight", map.iter().find(|(g, _)| *g == t).unwrap().1)
        }
    }
}

/// Writes the fixture's weights as an HF checkpoint; `packed` chooses 2B4T's packed layout or F32 latent values.
fn checkpoint(name: &str, packed: bool) -> std::path::PathBuf {
    let f = fixture();
    let dir = tmp(name);
    let mut t = Tensors::new();
    for info in f.tensors() {
        let (cols, rows) = (info.row_len(), info.n_rows());
        let data = f.tensor_data(info);
        let hf = hf_name(&info.name);
        if info.ty == GgmlType::I2_S {
            let tern = decode_ternary(info.ty, data, rows * cols).unwrap();
            if packed {
                t.insert(
                    hf.clone(),
                    Stored { dtype: Dtype::U8, shape: vec![rows / 4, cols], bytes: tern.pack_hf(rows, cols) },
                );
                t.insert(hf.replace(".weight", ".weight_scale"), store(Dtype::F32, &[1], &[tern.scale]));
            } else {
                t.insert(hf, store(Dtype::F32, &[rows, cols], &tern.values()));
            }
        } else {
            let mut v = vec![0f32; rows * cols];
            let rb = info.ty.row_bytes(cols);
            for r in 0..rows {
                ternlm_kernels::scalar::dequantize_row(
                    info.ty,
                    &data[r * rb..(r + 1) * rb],
                    &mut v[r * cols..(r + 1) * cols],
                    1.0,
                )
                .unwrap();
            }
            let shape = if info.dims.len() == 1 { vec![cols] } else { vec![rows, cols] };
            t.insert(hf, store(if info.dims.len() == 1 { Dtype::F32 } else { Dtype::F16 }, &shape, &v));
        }
    }
    let config = json!({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "vocab_size": 128256, "max_position_embeddings": 512, "tie_word_embeddings": true,
        "hidden_act": "relu2",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
    });
    write_checkpoint(&dir, &config, &t, 1);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(shared().join("fixtures/tokenizer/hf/llama3").join(file), dir.join(file)).unwrap();
    }
    dir
}

fn convert(dir: &std::path::Path) -> GgufFile {
    let ck = HfCheckpoint::open(dir).unwrap();
    let mut opts = ConvertOptions::new(parse_type("i2_s").unwrap());
    opts.pre = PreChoice::Omit;
    let plan = ternlm_convert::plan(&ck, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    let out = dir.join("out.gguf");
    ternlm_convert::write(&ck, &plan, &out, |_, _| {}).unwrap();
    GgufFile::open(out).unwrap()
}

#[test]
fn packed_checkpoint_gives_bitnet_cpp_i2s_bytes() {
    let (reference, out) = (fixture(), convert(&checkpoint("i2s-packed", true)));
    let mut n = 0;
    for info in reference.tensors().iter().filter(|t| t.ty == GgmlType::I2_S) {
        let ours = out.tensor_info(&info.name).unwrap();
        assert_eq!(ours.ty, GgmlType::I2_S);
        let (a, b) = (out.tensor_data(ours), reference.tensor_data(info));
        assert_eq!(a.len(), b.len(), "{}: size", info.name);
        let body = a.len() - 32;
        assert!(a[..body + 4] == b[..body + 4], "{}: codes or scale differ from bitnet.cpp's bytes", info.name);
        assert!(a[body + 4..].iter().all(|&x| x == 0), "{}: tail padding", info.name);
        n += 1;
    }
    assert_eq!(n, 14);
    // No tokenizer.ggml.pre, like the official 2B4T file and this fixture.
    assert!(out.get("tokenizer.ggml.pre").is_none());
    assert_eq!(out.get_str("general.architecture").unwrap(), Some("bitnet-b1.58"));
}

#[test]
fn latent_checkpoint_of_the_same_weights_gives_the_same_codes() {
    // Absmean of values code·s is s·(fraction of non-zero codes), so the codes survive a re-ternarization
    // exactly while the stored scale becomes that absmean.
    let (reference, out) = (fixture(), convert(&checkpoint("i2s-latent", false)));
    for info in reference.tensors().iter().filter(|t| t.ty == GgmlType::I2_S) {
        let ours = out.tensor_info(&info.name).unwrap();
        let (a, b) = (out.tensor_data(ours), reference.tensor_data(info));
        let body = a.len() - 32;
        assert!(a[..body] == b[..body], "{}: codes differ", info.name);
        let n = info.row_len() * info.n_rows();
        let tern = decode_ternary(GgmlType::I2_S, b, n).unwrap();
        let want = Ternary::absmean(&tern.values()).scale;
        assert_eq!(decode_ternary(GgmlType::I2_S, a, n).unwrap().scale, want, "{}: scale", info.name);
    }
}
