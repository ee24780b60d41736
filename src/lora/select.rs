//! Which modules a PEFT config adapts, and with which rank and alpha: PEFT's matching rules
//! (`check_target_module_exists`, `get_pattern_key`, `_set_trainable`) over module names.

use formats::lora::peft::{Modules, PeftConfig, ALL_LINEAR};
use regex::Regex;

/// A compiled [`PeftConfig`] for questions about module names (`model.layers.0.self_attn.q_proj`).
pub struct Selection {
    target: Option<Matcher>,
    exclude: Option<Matcher>,
    layers: Option<(Vec<usize>, Vec<Regex>)>,
    /// `modules_to_save` entries, which PEFT never adapts.
    saved: Vec<Regex>,
    saved_names: Vec<String>,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    r: usize,
    lora_alpha: f64,
    rslora: bool,
}

enum Matcher {
    /// Exact names, or names ending with `.` + an entry.
    Names(Vec<String>),
    /// A regex matched against the whole name.
    Regex(Regex),
    /// `all-linear`: every linear layer but the output head.
    AllLinear,
}

impl Matcher {
    fn new(modules: &Modules, field: &str) -> Result<Matcher, String> {
        Ok(match modules {
            Modules::Regex(s) if s == ALL_LINEAR => Matcher::AllLinear,
            Modules::Regex(s) => Matcher::Regex(anchored(s, "^(?:", ")$", field)?),
            Modules::List(names) => Matcher::Names(names.clone()),
        })
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Matcher::Names(names) => names.iter().any(|n| module == n || ends_with_segment(module, n)),
            Matcher::Regex(re) => re.is_match(module),
            Matcher::AllLinear => last_segment(module) != "lm_head",
        }
    }
}

fn anchored(pattern: &str, open: &str, close: &str, field: &str) -> Result<Regex, String> {
    Regex::new(&format!("{open}{pattern}{close}"))
        .map_err(|e| format!("`{field}` entry {pattern:?} is not a regular expression qforge understands: {e}"))
}

/// PEFT's `get_pattern_key`: a key matches a module name ending with it after a `.` boundary.
fn compile_patterns<T: Copy>(entries: &[(String, T)], field: &str) -> Result<Vec<(Regex, T)>, String> {
    entries.iter().map(|(k, v)| Ok((anchored(k, r"^(?:.*\.)?(?:", ")$", field)?, *v))).collect()
}

fn ends_with_segment(module: &str, name: &str) -> bool {
    module.strip_suffix(name).is_some_and(|head| head.ends_with('.'))
}

fn last_segment(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

impl Selection {
    pub fn new(config: &PeftConfig) -> Result<Selection, String> {
        let target = config.target_modules.as_ref().map(|m| Matcher::new(m, "target_modules")).transpose()?;
        let exclude = config.exclude_modules.as_ref().map(|m| Matcher::new(m, "exclude_modules")).transpose()?;
        let layers = match &config.layers_to_transform {
            None => None,
            Some(indices) => {
                // PEFT: with no pattern, the first numbered segment after at least two segments.
                let patterns = if config.layers_pattern.is_empty() {
                    vec!["[^.]*".to_string()]
                } else {
                    config.layers_pattern.clone()
                };
                let res = patterns
                    .iter()
                    .map(|p| anchored(p, r"^.*?\.(?:", r")\.(\d+)\.", "layers_pattern"))
                    .collect::<Result<Vec<_>, _>>()?;
                Some((indices.clone(), res))
            }
        };
        let saved = config
            .modules_to_save
            .iter()
            .map(|m| anchored(m, r"^(?:.*\.)?(?:", r")(?:\..*)?$", "modules_to_save"))
            .collect::<Result<Vec<_>, _>>()?;
        let rank_pattern = compile_patterns(&config.rank_pattern, "rank_pattern")?;
        let alpha_pattern = compile_patterns(&config.alpha_pattern, "alpha_pattern")?;
        Ok(Selection {
            target,
            exclude,
            layers,
            saved,
            saved_names: config.modules_to_save.clone(),
            rank_pattern,
            alpha_pattern,
            r: config.r,
            lora_alpha: config.lora_alpha,
            rslora: config.use_rslora,
        })
    }

    /// Whether PEFT would put a LoRA layer on `module`. Without `target_modules` (PEFT then picks
    /// per-architecture defaults) every module is accepted.
    pub fn is_target(&self, module: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|m| m.matches(module)) || self.saved.iter().any(|re| re.is_match(module)) {
            return false;
        }
        let Some(target) = &self.target else {
            return true;
        };
        match target {
            Matcher::Names(names) if names.iter().any(|n| n == module) => true,
            Matcher::Names(_) => target.matches(module) && self.in_selected_layer(module),
            _ => target.matches(module),
        }
    }

    fn in_selected_layer(&self, module: &str) -> bool {
        let Some((indices, patterns)) = &self.layers else {
            return true;
        };
        let index = patterns.iter().find_map(|re| re.captures(module)?.get(1)?.as_str().parse::<usize>().ok());
        index.is_some_and(|i| indices.contains(&i))
    }

    /// Whether `module` is one of `modules_to_save` (PEFT matches them as name suffixes).
    pub fn is_saved_module(&self, module: &str) -> bool {
        self.saved_names.iter().any(|n| module.ends_with(n.as_str()))
    }

    /// The module's rank and alpha: the first matching `rank_pattern` / `alpha_pattern` entry, else
    /// `r` / `lora_alpha`.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.r, |(_, r)| *r);
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.lora_alpha, |(_, a)| *a);
        (r, alpha)
    }

    /// The module's rank and its scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn rank_scale(&self, module: &str) -> (usize, f64) {
        let (r, alpha) = self.rank_alpha(module);
        (r, scale(alpha, r, self.rslora))
    }
}

pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(json: &str) -> Selection {
        Selection::new(&PeftConfig::parse(json).unwrap().unwrap()).unwrap()
    }

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const Q3: &str = "model.layers.3.self_attn.q_proj";
    const V3: &str = "model.layers.3.self_attn.v_proj";

    #[test]
    fn list_targets_match_whole_segments() {
        let s = selection(r#"{"target_modules": ["q_proj", "model.layers.3.self_attn.v_proj"]}"#);
        assert!(s.is_target(Q0) && s.is_target(Q3) && s.is_target(V3));
        assert!(!s.is_target("model.layers.0.self_attn.xq_proj"));
        assert!(!s.is_target("model.layers.0.self_attn.v_proj"));
    }

    #[test]
    fn regex_targets_match_the_whole_name() {
        let s = selection(r#"{"target_modules": ".*layers\\.3\\..*_proj"}"#);
        assert!(s.is_target(Q3) && s.is_target(V3) && !s.is_target(Q0));
        let s = selection(r#"{"target_modules": "q_proj"}"#);
        assert!(!s.is_target(Q0), "a regex must match the whole name");
        let s = selection(r#"{"target_modules": "all-linear"}"#);
        assert!(s.is_target(Q0) && !s.is_target("lm_head"));
    }

    #[test]
    fn layers_to_transform_limits_list_targets() {
        let s = selection(r#"{"target_modules": ["q_proj"], "layers_to_transform": [1, 3]}"#);
        assert!(s.is_target(Q3) && !s.is_target(Q0));
        let s = selection(r#"{"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}"#);
        assert!(s.is_target(Q0) && !s.is_target(Q3));
        let s = selection(r#"{"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": ["h"]}"#);
        assert!(!s.is_target(Q0), "the pattern names the layer list");
    }

    #[test]
    fn excluded_and_saved_modules_are_not_targets() {
        let s = selection(
            r#"{"target_modules": ["q_proj", "lm_head"], "exclude_modules": ["model.layers.3.self_attn.q_proj"], "modules_to_save": ["lm_head"]}"#,
        );
        assert!(s.is_target(Q0) && !s.is_target(Q3) && !s.is_target("lm_head"));
        assert!(s.is_saved_module("lm_head") && !s.is_saved_module(Q0));
    }

    #[test]
    fn patterns_pick_rank_and_alpha_in_file_order() {
        let s = selection(
            r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"layers.3.self_attn.q_proj": 4, "q_proj": 2},
                "alpha_pattern": {"v_proj": 3}}"#,
        );
        assert_eq!(s.rank_alpha(Q3), (4, 16.0));
        assert_eq!(s.rank_alpha(Q0), (2, 16.0));
        assert_eq!(s.rank_alpha(V3), (8, 3.0));
        assert_eq!(s.rank_scale(V3), (8, 3.0 / 8.0));
        let s = selection(r#"{"r": 16, "lora_alpha": 8, "use_rslora": true}"#);
        assert_eq!(s.rank_scale(Q0), (16, 2.0));
    }
}
