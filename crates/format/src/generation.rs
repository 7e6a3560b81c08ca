//! `generation_config.json`: the end-of-sequence ids a checkpoint stops on (often more than config.json names:
//! Qwen3 lists both `<|im_end|>` and `<|endoftext|>`). Read here because only `format` and `store` open model
//! files; the engine decides what to do with the ids.

use std::path::Path;

use serde_json::Value;

use crate::FormatError;

/// What the engine takes from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// `eos_token_id`, one id or a list.
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// `DIR/generation_config.json` of a safetensors directory; the default (no ids) for a GGUF file or a directory
    /// without one. A file that exists but is not valid JSON is an error naming it.
    pub fn read(model_root: &Path) -> Result<Self, FormatError> {
        let p = model_root.join("generation_config.json");
        if !model_root.is_dir() || !p.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| FormatError::io(&p, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| FormatError::Json { path: p.clone(), source })?;
        let ids = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok()).collect(),
            Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
            None => Vec::new(),
        };
        Ok(GenerationConfig { eos_token_ids: ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_int_list_missing_and_bad_json() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(GenerationConfig::read(d.path()).unwrap().eos_token_ids, Vec::<u32>::new());
        let p = d.path().join("generation_config.json");
        std::fs::write(&p, r#"{"eos_token_id": 7}"#).unwrap();
        assert_eq!(GenerationConfig::read(d.path()).unwrap().eos_token_ids, vec![7]);
        std::fs::write(&p, r#"{"eos_token_id": [5, 6]}"#).unwrap();
        assert_eq!(GenerationConfig::read(d.path()).unwrap().eos_token_ids, vec![5, 6]);
        std::fs::write(&p, "{").unwrap();
        let e = GenerationConfig::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("generation_config.json"), "{e}");
    }
}
