//! Chat templates: the model's `tokenizer.chat_template` (Jinja) rendered with minijinja, configured like
//! Hugging Face's renderer (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`).

use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use ternlm_gguf::GgufFile;
use ternlm_tokenizer::Tokenizer;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// ChatML, used when a model has no template (as llama.cpp does).
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn from_gguf(f: &GgufFile, tok: &Tokenizer) -> Result<ChatTemplate> {
        let source = f.get_str("tokenizer.chat_template")?.unwrap_or(CHATML).to_string();
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        Ok(ChatTemplate { source, bos: text(tok.bos), eos: text(tok.eos) })
    }

    pub fn new(source: &str, bos: &str, eos: &str) -> ChatTemplate {
        ChatTemplate { source: source.into(), bos: bos.into(), eos: eos.into() }
    }

    /// Renders the conversation, ending with the assistant's turn opener when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; a fixed, documented value keeps rendering deterministic.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template("chat", &self.source).context("the model's chat template does not parse")?;
        let t = env.get_template("chat")?;
        let out = t
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .context("rendering the chat template")?;
        Ok(out)
    }
}

/// Tokenizes a rendered chat prompt: special tokens written by the template are parsed, and BOS is added only if
/// the vocabulary asks for it and the template did not already write it.
pub fn encode_chat(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let template_wrote_bos =
        tok.bos.and_then(|b| tok.token_text(b)).is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tok.encode(text, !template_wrote_bos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, "", "");
        let s = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('bad') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "");
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "HI");
        assert!(t.render(&[Message::new("system", "x")], false).is_err());
    }
}
