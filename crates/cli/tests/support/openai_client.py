"""Drives a running `ternlm serve` with the official `openai` Python client and prints what came back as JSON.

Usage: openai_client.py BASE_URL MODEL CHAT_PROMPT COMPLETION_PROMPT MAX_TOKENS
Greedy (temperature 0) requests: a chat completion and a completion, each streaming and not.
"""
import json
import sys

import openai

base_url, model, chat_prompt, completion_prompt, max_tokens = sys.argv[1:6]
max_tokens = int(max_tokens)
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
out = {"openai_version": openai.__version__}

messages = [{"role": "user", "content": chat_prompt}]
r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
out["chat"] = {
    "text": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
    "object": r.object,
}

stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage, n_chunks, role = "", None, None, 0, None
for chunk in stream:
    n_chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.role:
            role = c.delta.role
        if c.delta.content:
            text += c.delta.content
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = {"text": text, "role": role, "finish_reason": finish, "usage": usage, "chunks": n_chunks}

r = client.completions.create(model=model, prompt=completion_prompt, temperature=0, max_tokens=max_tokens)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump()}

text, finish, n_chunks = "", None, 0
for chunk in client.completions.create(
    model=model, prompt=completion_prompt, temperature=0, max_tokens=max_tokens, stream=True
):
    n_chunks += 1
    for c in chunk.choices:
        text += c.text
        if c.finish_reason:
            finish = c.finish_reason
out["completion_stream"] = {"text": text, "finish_reason": finish, "chunks": n_chunks}

out["models"] = [m.id for m in client.models.list()]
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    out["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
