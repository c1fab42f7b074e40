#!/usr/bin/env python3
"""Writes small valid GGUF files into fuzz/corpus/gguf_reader as starting points for the fuzzer."""
import os, struct

def s(x: bytes) -> bytes:
    return struct.pack("<Q", len(x)) + x

def kv_str(k, v):
    return s(k.encode()) + struct.pack("<I", 8) + s(v.encode())

def kv_u32(k, v):
    return s(k.encode()) + struct.pack("<II", 4, v)

def kv_str_arr(k, items):
    return s(k.encode()) + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(s(i.encode()) for i in items)

def gguf(kvs, tensors):
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    data, off, infos = b"", 0, b""
    for name, dims, ty, payload in tensors:
        infos += s(name.encode()) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ty, off)
        pad = (-len(payload)) % 32
        data += payload + b"\0" * pad
        off += len(payload) + pad
    out = head + infos
    out += b"\0" * ((-len(out)) % 32)
    return out + data

out = os.path.join(os.path.dirname(__file__), "corpus", "gguf_reader")
os.makedirs(out, exist_ok=True)
toks = ["a", "b", "ab", "Ġ", "Ġa", "<s>", "</s>"]
vocab = [kv_str("tokenizer.ggml.model", "gpt2"), kv_str("tokenizer.ggml.pre", "llama-bpe"), kv_str_arr("tokenizer.ggml.tokens", toks),
         kv_str_arr("tokenizer.ggml.merges", ["a b", "Ġ a"]), kv_u32("tokenizer.ggml.bos_token_id", 5)]
open(os.path.join(out, "vocab.gguf"), "wb").write(gguf(vocab, []))
spm = [kv_str("tokenizer.ggml.model", "llama"), kv_str_arr("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "▁", "a", "<0x41>"])]
open(os.path.join(out, "spm.gguf"), "wb").write(gguf(spm, []))
tensors = [("w", [32, 2], 8, b"\x01" * 68), ("f", [4], 0, struct.pack("<4f", 1, 2, 3, 4)), ("t", [128, 1], 36, b"\x55" * 32 + struct.pack("<f", 0.5) + b"\0" * 28)]
open(os.path.join(out, "tensors.gguf"), "wb").write(gguf([kv_str("general.architecture", "llama"), kv_u32("general.alignment", 32)], tensors))
print("seeds written to", out)
