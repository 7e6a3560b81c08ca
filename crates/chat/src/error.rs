//! The one error type of the crate. Variants name the file, template or token at fault; none of them is raised
//! by a panic, because every input here (prompts, templates, model metadata) comes from users.

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A tokenizer could not be built: `path` is the file (or `<embedded>`) it came from.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error("tokenizer: encoding failed: {0}")]
    Encode(String),
    #[error("tokenizer: decoding failed: {0}")]
    Decode(String),
    /// A chat template could not be found or loaded: `path` is where it was looked for.
    #[error("{path}: chat template: {msg}")]
    TemplateLoad { path: String, msg: String },
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    /// The template called `raise_exception(msg)`: the conversation is one it refuses (e.g. roles out of order).
    #[error("chat template rejected the conversation: {0}")]
    TemplateRejected(String),
    /// Rendering failed for another reason (an undefined method, a type error in the template).
    #[error("chat template failed to render: {0}")]
    TemplateRender(String),
    /// The input to a template is not the shape it must be (e.g. `messages` is not an array).
    #[error("chat template input: {0}")]
    TemplateInput(String),
}
