//! The names PEFT gives the tensors it saves.
//!
//! A saved key is the model's parameter name with the `base_model.model.` prefix of the wrapped model
//! and, usually, the adapter name removed: `…q_proj.lora_A.weight` (or `…lora_A.default.weight` when a
//! tool kept the adapter name). Embeddings use `lora_embedding_A/B` with no `.weight`; DoRA saves
//! `lora_magnitude_vector` (also without `.weight`); `lora_bias` saves `lora_B.bias`. Whole tensors
//! (`modules_to_save` copies, trained biases, saved embeddings) keep the base parameter's name, possibly
//! with the `base_layer.` or `modules_to_save.<adapter>.` of the module wrapping it.

/// Prefix PEFT's model wrapper puts in front of the base model's parameter names.
pub const BASE_MODEL_PREFIX: &str = "base_model.model.";

/// Which LoRA tensor of a module a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraPart {
    /// `lora_A.weight`: `[r, in]`.
    A,
    /// `lora_B.weight`: `[out, r]`.
    B,
    /// `lora_B.bias`: `[out]` (`lora_bias = true`).
    BBias,
    /// `lora_embedding_A`: `[r, num_embeddings]`.
    EmbeddingA,
    /// `lora_embedding_B`: `[embedding_dim, r]`.
    EmbeddingB,
    /// DoRA's `lora_magnitude_vector`: one value per output feature.
    Magnitude,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeftKey {
    /// A LoRA tensor of the module named `module` in the base model (e.g.
    /// `model.layers.0.self_attn.q_proj`).
    Lora { module: String, part: LoraPart },
    /// A whole tensor standing for the base parameter `module` + `.` + `param`.
    Full { module: String, param: String },
    /// Not a name PEFT writes.
    Unknown,
}

impl PeftKey {
    pub fn parse(key: &str) -> PeftKey {
        let name = key.strip_prefix(BASE_MODEL_PREFIX).unwrap_or(key);
        let parts: Vec<&str> = name.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return PeftKey::Unknown;
        }
        match parts.iter().position(|p| p.starts_with("lora_")) {
            Some(i) => lora_key(&parts[..i], parts[i], &parts[i + 1..]),
            None => full_key(&parts),
        }
    }
}

fn lora_key(module: &[&str], marker: &str, rest: &[&str]) -> PeftKey {
    use LoraPart::*;
    // `rest` is the parameter suffix, optionally preceded by the adapter name.
    let suffix = |wanted: &[&str]| match rest {
        [] => wanted.contains(&""),
        [only] => wanted.contains(only) || (wanted.contains(&"") && !is_param(only)),
        [_adapter, param] => wanted.contains(param),
        _ => false,
    };
    let part = match marker {
        "lora_A" if suffix(&["weight"]) => Some(A),
        "lora_B" if suffix(&["weight"]) => Some(B),
        "lora_B" if suffix(&["bias"]) => Some(BBias),
        "lora_embedding_A" if suffix(&[""]) => Some(EmbeddingA),
        "lora_embedding_B" if suffix(&[""]) => Some(EmbeddingB),
        "lora_magnitude_vector" if suffix(&["", "weight"]) => Some(Magnitude),
        _ => None,
    };
    match part {
        Some(part) if !module.is_empty() => PeftKey::Lora { module: module.join("."), part },
        _ => PeftKey::Unknown,
    }
}

fn is_param(segment: &str) -> bool {
    segment == "weight" || segment == "bias"
}

fn full_key(parts: &[&str]) -> PeftKey {
    let Some((param, path)) = parts.split_last() else {
        return PeftKey::Unknown;
    };
    let mut module: Vec<&str> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            "base_layer" => i += 1,
            // `modules_to_save.<adapter>.` (the adapter name is absent in some saved files).
            "modules_to_save" => i += if i + 1 < path.len() { 2 } else { 1 },
            seg => {
                module.push(seg);
                i += 1;
            }
        }
    }
    if module.is_empty() || !is_param(param) {
        return PeftKey::Unknown;
    }
    PeftKey::Full { module: module.join("."), param: (*param).to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(module: &str, part: LoraPart) -> PeftKey {
        PeftKey::Lora { module: module.into(), part }
    }

    fn full(module: &str, param: &str) -> PeftKey {
        PeftKey::Full { module: module.into(), param: param.into() }
    }

    #[test]
    fn lora_keys_with_and_without_prefix_and_adapter_name() {
        let q = "model.layers.0.self_attn.q_proj";
        for key in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_A.medical.weight",
        ] {
            assert_eq!(PeftKey::parse(key), lora(q, LoraPart::A), "{key}");
        }
        assert_eq!(PeftKey::parse(&format!("{q}.lora_B.weight")), lora(q, LoraPart::B));
        assert_eq!(PeftKey::parse(&format!("{q}.lora_B.bias")), lora(q, LoraPart::BBias));
        assert_eq!(PeftKey::parse(&format!("{q}.lora_B.default.bias")), lora(q, LoraPart::BBias));
        assert_eq!(PeftKey::parse(&format!("{q}.lora_magnitude_vector")), lora(q, LoraPart::Magnitude));
        assert_eq!(PeftKey::parse(&format!("{q}.lora_magnitude_vector.default")), lora(q, LoraPart::Magnitude));
        assert_eq!(PeftKey::parse(&format!("{q}.lora_magnitude_vector.default.weight")), lora(q, LoraPart::Magnitude));
        let e = "model.embed_tokens";
        assert_eq!(PeftKey::parse(&format!("base_model.model.{e}.lora_embedding_A")), lora(e, LoraPart::EmbeddingA));
        assert_eq!(PeftKey::parse(&format!("{e}.lora_embedding_B.default")), lora(e, LoraPart::EmbeddingB));
    }

    #[test]
    fn whole_tensors_name_the_base_parameter() {
        assert_eq!(PeftKey::parse("base_model.model.lm_head.weight"), full("lm_head", "weight"));
        assert_eq!(PeftKey::parse("base_model.model.score.modules_to_save.default.weight"), full("score", "weight"));
        assert_eq!(
            PeftKey::parse("base_model.model.model.embed_tokens.base_layer.weight"),
            full("model.embed_tokens", "weight")
        );
        assert_eq!(
            PeftKey::parse("base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias"),
            full("model.layers.1.self_attn.q_proj", "bias")
        );
    }

    #[test]
    fn other_names_are_unknown() {
        for key in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
            "model.layers.0.q_proj.lora_C.weight",
            "lora_A.weight",
            "model.layers.0.q_proj.lora_A.default.extra.weight",
            "model.layers.0.q_proj.lora_embedding_A.weight",
            "base_model.model.model.layers..q_proj.lora_A.weight",
            "model.layers.0.q_proj.trainable_tokens_delta",
            "weight",
        ] {
            assert_eq!(PeftKey::parse(key), PeftKey::Unknown, "{key}");
        }
    }
}
