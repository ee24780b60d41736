//! `adapter_config.json`: the LoRA fields that change what a merge computes, with PEFT's defaults.
//!
//! Fields that only matter for training (dropout, init, ...) are ignored; fields that describe a
//! structure qforge cannot merge (layer replication, parameter targeting, ...) are refused by name.

use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// PEFT's `target_modules` shorthand for every linear layer except the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// A set of modules as PEFT's config names them: a list of names (a module is in the set when its
/// name equals an entry or ends with `.` + an entry) or one regular expression matched against the
/// whole module name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modules {
    List(Vec<String>),
    Regex(String),
}

/// `bias`: which of the base model's biases were trained (and saved) with the adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    None,
    All,
    LoraOnly,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    pub base_model_name_or_path: Option<String>,
    /// `auto_mapping.base_model_class`, e.g. `LlamaForCausalLM`.
    pub base_model_class: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    /// `None` when the config leaves it to PEFT's per-architecture defaults.
    pub target_modules: Option<Modules>,
    pub exclude_modules: Option<Modules>,
    /// Layer indices the adapter is limited to (`None`: every layer).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Names of the module lists holding the layers (`layers`, `h`, ...); empty: any.
    pub layers_pattern: Vec<String>,
    /// Per-module rank overrides, in file order (PEFT takes the first pattern that matches).
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
    pub bias: Bias,
    /// `lora_bias`: `lora_B` carries a bias, added to the base layer's bias on merge.
    pub lora_bias: bool,
}

impl PeftConfig {
    pub fn read(path: &Path) -> Result<PeftConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|msg| Error::invalid(path, msg))?.map_err(|msg| Error::unsupported(path, msg))
    }

    /// The outer error is a malformed file, the inner one a well-formed config qforge cannot merge.
    pub fn parse(text: &str) -> Result<Result<PeftConfig, String>, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(map) = value else {
            return Err("expected a JSON object".into());
        };
        let patterns: OrderedPatterns = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let fields = Fields(&map);
        if let Some(problem) = fields.unsupported()? {
            return Ok(Err(problem));
        }
        let r = fields.positive_int("r")?.unwrap_or(8);
        let config = PeftConfig {
            base_model_name_or_path: fields.string("base_model_name_or_path")?,
            base_model_class: match map.get("auto_mapping") {
                Some(Value::Object(m)) => m.get("base_model_class").and_then(Value::as_str).map(str::to_string),
                _ => None,
            },
            r,
            lora_alpha: fields.number("lora_alpha")?.unwrap_or(8.0),
            use_rslora: fields.flag("use_rslora")?,
            use_dora: fields.flag("use_dora")?,
            fan_in_fan_out: fields.flag("fan_in_fan_out")?,
            target_modules: fields.modules("target_modules")?,
            exclude_modules: fields.modules("exclude_modules")?,
            layers_to_transform: fields.layers_to_transform()?,
            layers_pattern: fields.strings("layers_pattern")?,
            rank_pattern: patterns.rank_pattern()?,
            alpha_pattern: patterns.alpha_pattern()?,
            modules_to_save: fields.strings("modules_to_save")?,
            bias: match fields.string("bias")?.as_deref() {
                None | Some("none") => Bias::None,
                Some("all") => Bias::All,
                Some("lora_only") => Bias::LoraOnly,
                Some(other) => {
                    return Err(format!("`bias` is {other:?}; PEFT allows \"none\", \"all\" or \"lora_only\""))
                }
            },
            lora_bias: fields.flag("lora_bias")?,
        };
        Ok(Ok(config))
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// Present and not `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// Settings that change the model in ways a weight merge cannot express.
    fn unsupported(&self) -> Result<Option<String>, String> {
        if let Some(t) = self.string("peft_type")? {
            if t != "LORA" {
                return Ok(Some(format!("peft_type is {t:?}; qforge merges LoRA adapters (\"LORA\") only")));
            }
        }
        let non_empty = |key: &str| match self.get(key) {
            None => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        let refused = [
            ("layer_replication", "duplicates base layers, which changes the model's structure"),
            ("target_parameters", "targets raw parameters (e.g. MoE experts), which qforge does not merge yet"),
            ("trainable_token_indices", "trains selected token embeddings, which qforge does not merge yet"),
            ("alora_invocation_tokens", "is an activated LoRA, which only applies after its invocation tokens"),
        ];
        if let Some((key, why)) = refused.iter().find(|(key, _)| non_empty(key)) {
            return Ok(Some(format!("`{key}` is set: the adapter {why}")));
        }
        if self.flag("use_qalora")? {
            return Ok(Some("`use_qalora` is set: QA-LoRA adapters pool their inputs and cannot be merged".into()));
        }
        Ok(None)
    }

    fn string(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("`{key}` must be a string, found {other}")),
        }
    }

    fn flag(&self, key: &str) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("`{key}` must be true or false, found {other}")),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| format!("`{key}` must be a number, found {v}")),
        }
    }

    fn positive_int(&self, key: &str) -> Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                positive_int(v).map(Some).ok_or_else(|| format!("`{key}` must be a positive integer, found {v}"))
            }
        }
    }

    /// A string or a list of strings (`null`: empty).
    fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        match self.modules(key)? {
            None => Ok(Vec::new()),
            Some(Modules::Regex(s)) => Ok(vec![s]),
            Some(Modules::List(l)) => Ok(l),
        }
    }

    fn modules(&self, key: &str) -> Result<Option<Modules>, String> {
        let bad = |v: &Value| format!("`{key}` must be a string or a list of strings, found {v}");
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(Modules::Regex(s.clone()))),
            Some(v @ Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()
                .map(|l| Some(Modules::List(l))),
            Some(v) => Err(bad(v)),
        }
    }

    /// An index or a list of indices; an empty list means every layer, as in PEFT.
    fn layers_to_transform(&self) -> Result<Option<Vec<usize>>, String> {
        let key = "layers_to_transform";
        let bad = |v: &Value| format!("`{key}` must be a layer index or a list of them, found {v}");
        let index = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) if items.is_empty() => Ok(None),
            Some(v @ Value::Array(items)) => {
                items.iter().map(|i| index(i).ok_or_else(|| bad(v))).collect::<Result<_, _>>().map(Some)
            }
            Some(v) => index(v).map(|i| Some(vec![i])).ok_or_else(|| bad(v)),
        }
    }
}

fn positive_int(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&n| n > 0).and_then(|n| usize::try_from(n).ok())
}

/// `rank_pattern` and `alpha_pattern` with their keys in file order (a JSON object read through
/// `serde_json::Value` would come back sorted).
#[derive(serde::Deserialize)]
struct OrderedPatterns {
    #[serde(default)]
    rank_pattern: Option<OrderedObject>,
    #[serde(default)]
    alpha_pattern: Option<OrderedObject>,
}

impl OrderedPatterns {
    fn rank_pattern(&self) -> Result<Vec<(String, usize)>, String> {
        Self::entries(&self.rank_pattern, "rank_pattern", "a positive integer", positive_int)
    }

    fn alpha_pattern(&self) -> Result<Vec<(String, f64)>, String> {
        Self::entries(&self.alpha_pattern, "alpha_pattern", "a number", |v| v.as_f64().filter(|x| x.is_finite()))
    }

    fn entries<T>(
        object: &Option<OrderedObject>,
        field: &str,
        what: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<(String, T)>, String> {
        let Some(OrderedObject(entries)) = object else {
            return Ok(Vec::new());
        };
        entries
            .iter()
            .map(|(k, v)| {
                convert(v)
                    .map(|x| (k.clone(), x))
                    .ok_or_else(|| format!("`{field}` entry {k:?} must be {what}, found {v}"))
            })
            .collect()
    }
}

struct OrderedObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntriesInOrder;
        impl<'de> Visitor<'de> for EntriesInOrder {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedObject, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(OrderedObject(entries))
            }
        }
        deserializer.deserialize_map(EntriesInOrder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PeftConfig {
        PeftConfig::parse(text).unwrap().unwrap()
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse(r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#);
        assert_eq!((c.r, c.lora_alpha, c.bias), (8, 8.0, Bias::None));
        assert!(!c.use_rslora && !c.use_dora && !c.fan_in_fan_out && !c.lora_bias);
        assert_eq!(c.target_modules, Some(Modules::List(vec!["q_proj".into()])));
        assert_eq!(c.layers_to_transform, None);
    }

    #[test]
    fn every_merge_field_is_read() {
        let c = parse(
            r#"{"r": 4, "lora_alpha": 12.5, "use_rslora": true, "use_dora": true, "fan_in_fan_out": true,
                "target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["lm_head"], "layers_to_transform": 3,
                "layers_pattern": "layers", "rank_pattern": {"z_proj": 2, "a_proj": 6},
                "alpha_pattern": {"v_proj": 3}, "modules_to_save": ["lm_head"], "bias": "lora_only",
                "lora_bias": true, "base_model_name_or_path": "org/base",
                "auto_mapping": {"base_model_class": "LlamaForCausalLM"}, "layer_replication": null}"#,
        );
        assert_eq!((c.r, c.lora_alpha), (4, 12.5));
        assert!(c.use_rslora && c.use_dora && c.fan_in_fan_out && c.lora_bias);
        assert_eq!(c.target_modules, Some(Modules::Regex(r".*\.(q|v)_proj".into())));
        assert_eq!(c.exclude_modules, Some(Modules::List(vec!["lm_head".into()])));
        assert_eq!(c.layers_to_transform, Some(vec![3]));
        assert_eq!(c.layers_pattern, vec!["layers".to_string()]);
        // File order, not sorted order.
        assert_eq!(c.rank_pattern, vec![("z_proj".to_string(), 2), ("a_proj".to_string(), 6)]);
        assert_eq!(c.alpha_pattern, vec![("v_proj".to_string(), 3.0)]);
        assert_eq!(c.modules_to_save, vec!["lm_head".to_string()]);
        assert_eq!(c.bias, Bias::LoraOnly);
        assert_eq!(c.base_model_name_or_path.as_deref(), Some("org/base"));
        assert_eq!(c.base_model_class.as_deref(), Some("LlamaForCausalLM"));
    }

    #[test]
    fn malformed_fields_are_named() {
        for (text, field) in [
            (r#"{"r": 0}"#, "`r`"),
            (r#"{"r": "8"}"#, "`r`"),
            (r#"{"lora_alpha": "x"}"#, "`lora_alpha`"),
            (r#"{"use_dora": 1}"#, "`use_dora`"),
            (r#"{"target_modules": [1]}"#, "`target_modules`"),
            (r#"{"layers_to_transform": [-1]}"#, "`layers_to_transform`"),
            (r#"{"rank_pattern": {"q_proj": 0}}"#, "`rank_pattern`"),
            (r#"{"bias": "some"}"#, "`bias`"),
        ] {
            let err = PeftConfig::parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(PeftConfig::parse("[1]").unwrap_err().contains("object"));
        assert!(PeftConfig::parse("{").unwrap_err().contains("JSON"));
    }

    #[test]
    fn structures_a_merge_cannot_express_are_refused() {
        for (text, what) in [
            (r#"{"peft_type": "IA3"}"#, "IA3"),
            (r#"{"layer_replication": [[0, 4], [2, 5]]}"#, "layer_replication"),
            (r#"{"target_parameters": ["experts.gate_up_proj"]}"#, "target_parameters"),
            (r#"{"use_qalora": true}"#, "use_qalora"),
        ] {
            let err = PeftConfig::parse(text).unwrap().unwrap_err();
            assert!(err.contains(what), "{text}: {err}");
        }
    }
}
