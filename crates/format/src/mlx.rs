//! The `quantization` block of an MLX `config.json`: a default `{group_size, bits}` plus per-module overrides
//! (`"model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}`, or `false` for a module left in float).
//!
//! The tensor shapes are the authority (`bits = packed_cols·32/in`, `group = in/scale_cols`); this block only
//! cross-checks them, so a config that disagrees with its own tensors is reported instead of trusted.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::FormatError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlxQuantization {
    /// `(bits, group_size)` for modules without an override.
    pub default: Option<(usize, usize)>,
    /// Module path → `Some((bits, group))`, or `None` when the module is explicitly not quantized.
    pub overrides: BTreeMap<String, Option<(usize, usize)>>,
}

impl MlxQuantization {
    /// `Ok(None)` when the config has no quantization block (an HF float checkpoint).
    pub fn from_config_file(path: &Path) -> Result<Option<Self>, FormatError> {
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| FormatError::Json { path: path.to_path_buf(), source })?;
        Self::from_config_value(&v, path)
    }

    pub fn from_config_value(v: &Value, path: &Path) -> Result<Option<Self>, FormatError> {
        let Some(q) = v.get("quantization").or_else(|| v.get("quantization_config")) else { return Ok(None) };
        let obj = q.as_object().ok_or_else(|| FormatError::invalid(path, "`quantization` is not an object"))?;
        // HF-style quantization_config blocks of other quantizers (GPTQ, AWQ…) are not MLX's.
        if let Some(m) = obj.get("quant_method").and_then(Value::as_str) {
            return Err(FormatError::invalid(path, format!("quantization method `{m}` is not supported")));
        }
        let pair = |o: &serde_json::Map<String, Value>, what: &str| -> Result<(usize, usize), FormatError> {
            let get = |k: &str| {
                o.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| FormatError::MissingField {
                    path: path.to_path_buf(),
                    field: format!("quantization{what}.{k}"),
                })
            };
            Ok((get("bits")?, get("group_size")?))
        };
        let default = if obj.contains_key("bits") { Some(pair(obj, "")?) } else { None };
        let mut overrides = BTreeMap::new();
        for (k, val) in obj {
            match val {
                Value::Object(o) => {
                    overrides.insert(k.clone(), Some(pair(o, &format!(".\"{k}\""))?));
                }
                Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        if let Some(m) = obj.get("mode").and_then(Value::as_str)
            && m != "affine"
        {
            return Err(FormatError::invalid(
                path,
                format!("MLX quantization mode `{m}` is not supported (only affine)"),
            ));
        }
        Ok(Some(MlxQuantization { default, overrides }))
    }

    /// The `(bits, group)` that the config claims for a module, if it claims any.
    pub fn params_for(&self, module: &str) -> Option<(usize, usize)> {
        match self.overrides.get(module) {
            Some(p) => *p,
            None => self.default,
        }
    }
}
