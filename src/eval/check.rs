//! `qforge check`: a regression gate for CI. A model passes when its [`KldReport`] against a baseline
//! keeps every [`Thresholds`] limit; the verdicts render as a table, JSON or a JUnit XML suite (one
//! test case per threshold).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use formats::output::AtomicFile;
use serde::Serialize;

use super::kld::KldReport;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Largest allowed `PPL(model)/PPL(base) − 1`.
    pub max_ppl_increase: f64,
    /// Largest allowed mean KL(base ‖ model).
    pub max_kld: f64,
    /// Smallest allowed top-1 agreement.
    pub min_top1: f64,
}

/// A fraction written as `2%` or `0.02`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let (number, scale) = match s.trim().strip_suffix('%') {
        Some(percent) => (percent, 0.01),
        None => (s.trim(), 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v * scale),
        _ => Err(format!("{s:?} is not a non-negative fraction (examples: 2%, 0.02)")),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub metric: &'static str,
    pub value: f64,
    /// `<=` or `>=`.
    pub relation: &'static str,
    pub threshold: f64,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub pass: bool,
    pub verdicts: Vec<Verdict>,
    pub report: KldReport,
}

/// Judges `report` against `limits`.
pub fn check(report: KldReport, limits: &Thresholds) -> CheckReport {
    let at_most =
        |metric, value: f64, threshold| Verdict { metric, value, relation: "<=", threshold, pass: value <= threshold };
    let at_least =
        |metric, value: f64, threshold| Verdict { metric, value, relation: ">=", threshold, pass: value >= threshold };
    let verdicts = vec![
        at_most("ppl_increase", report.ppl_ratio.value - 1.0, limits.max_ppl_increase),
        at_most("kld", report.kld.value, limits.max_kld),
        at_least("top1", report.top1.value, limits.min_top1),
    ];
    CheckReport { pass: verdicts.iter().all(|v| v.pass), verdicts, report }
}

impl CheckReport {
    /// The verdict table, then the overall result.
    pub fn render(&self) -> String {
        let mut out = format!("{:<14} {:>12}    {:>12}  {}\n", "metric", "value", "threshold", "result");
        for v in &self.verdicts {
            let result = if v.pass { "pass" } else { "FAIL" };
            out += &format!("{:<14} {:>12.6} {} {:>12.6}  {result}\n", v.metric, v.value, v.relation, v.threshold);
        }
        let failed = self.verdicts.iter().filter(|v| !v.pass).count();
        out += &match failed {
            0 => "check passed\n".to_string(),
            n => format!("check FAILED: {n} of {} thresholds\n", self.verdicts.len()),
        };
        out
    }

    /// A JUnit XML document: one test suite, a test case per threshold, failed ones with a `<failure>`.
    pub fn junit(&self) -> String {
        let failures = self.verdicts.iter().filter(|v| !v.pass).count();
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"qforge check\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{:.3}\">\n",
            self.verdicts.len(),
            self.report.seconds
        );
        for v in &self.verdicts {
            let name = format!("{} {} {}", v.metric, v.relation, v.threshold);
            xml += &format!("  <testcase classname=\"qforge.check\" name=\"{}\"", escape(&name));
            if v.pass {
                xml += "/>\n";
            } else {
                let message = format!(
                    "{} = {} (threshold {} {}; baseline {})",
                    v.metric, v.value, v.relation, v.threshold, self.report.baseline
                );
                xml += &format!(">\n    <failure message=\"{}\"/>\n  </testcase>\n", escape(&message));
            }
        }
        xml + "</testsuite>\n"
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Writes `text` to `path` atomically.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(f.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::kld::Estimate;
    use crate::eval::perplexity::Protocol;

    fn report(ppl_ratio: f64, kld: f64, top1: f64) -> KldReport {
        let e = |value| Estimate { value, stderr: 0.0 };
        KldReport {
            baseline: "base<&>.gguf".into(),
            protocol: Protocol::LlamaCpp,
            ctx: 128,
            chunks: 2,
            tokens_scored: 126,
            ppl: e(10.0),
            ppl_base: e(10.0 / ppl_ratio),
            ppl_ratio: e(ppl_ratio),
            ln_ppl_ratio: e(ppl_ratio.ln()),
            kld: e(kld),
            kld_median: kld,
            kld_p99: kld,
            kld_max: kld,
            top1: e(top1),
            p_diff: e(0.0),
            p_diff_rms: e(0.0),
            p_diff_max: 0.0,
            seconds: 1.0,
        }
    }

    #[test]
    fn fractions_take_percent_or_plain_form() {
        assert_eq!(parse_fraction("2%"), Ok(0.02));
        assert_eq!(parse_fraction("0.02"), Ok(0.02));
        assert_eq!(parse_fraction(" 150 % "), Ok(1.5));
        for bad in ["", "%", "-1%", "two", "nan"] {
            assert!(parse_fraction(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_threshold_is_judged_and_reported() {
        let limits = Thresholds { max_ppl_increase: 0.02, max_kld: 0.05, min_top1: 0.9 };
        let good = check(report(1.01, 0.01, 0.95), &limits);
        assert!(good.pass && good.render().contains("check passed"));
        assert!(good.junit().contains("failures=\"0\"") && !good.junit().contains("<failure"));

        let bad = check(report(1.03, 0.01, 0.85), &limits);
        assert!(!bad.pass);
        let failed: Vec<&str> = bad.verdicts.iter().filter(|v| !v.pass).map(|v| v.metric).collect();
        assert_eq!(failed, ["ppl_increase", "top1"]);
        assert!(bad.render().contains("2 of 3"), "{}", bad.render());
        let xml = bad.junit();
        assert_eq!(xml.matches("<testcase").count(), 3);
        assert_eq!(xml.matches("<failure").count(), 2);
        assert!(xml.contains("base&lt;&amp;&gt;.gguf") && !xml.contains("base<&>"), "{xml}");
        assert!(check(report(1.0, 0.05, 0.9), &limits).pass, "limits are inclusive");
    }
}
