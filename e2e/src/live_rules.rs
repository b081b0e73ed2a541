//! The chart's dashboard queries and alert rules, evaluated by promtool over
//! a live scrape: every dashboard query returns data, every series an alert
//! reads exists, and no alert fires on a healthy system. Names alone
//! ([`crate::metric_names`]) miss a histogram read without `_bucket`, a
//! label value that is never exported, or a join on labels that differ.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// One target's `/metrics` text and the labels a scrape of it adds.
pub struct Scrape {
    pub target: BTreeMap<String, String>,
    pub text: String,
}

/// Intervals each scraped value is held for (the series promtool sees).
const STEPS: u32 = 10;

/// When the checks are evaluated: a scrape interval in, with every `rate`
/// window (2m) full and every `for` of the chart's alerts (2m) passed.
const EVAL_AT: &str = "5m";

/// Dashboard queries that show only what is under way (a drain's deadline)
/// and so return nothing on an idle system: for these only the series they
/// read are checked.
pub const EMPTY_WHEN_IDLE: [&str; 1] = ["ingest_drain_deadline_timestamp_seconds"];

/// Grafana's variables, as the dashboard expands them with every namespace selected.
fn expand(query: &str) -> String {
    query.replace("$__rate_interval", "2m").replace("$namespace", ".*")
}

/// A sample line of the text format: name, the inside of its braces, value.
pub fn sample(line: &str) -> Option<(&str, &str, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = closing_brace(line, open)?;
            (&line[..open], &line[open + 1..close], &line[close + 1..])
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], "", &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The `}` closing the `{` at `open`, skipping quoted label values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(open + i),
            _ => {}
        }
    }
    None
}

/// promtool input series: every finite sample of every scrape, with the
/// scrape's target labels, held at its value.
pub fn input_series(scrapes: &[Scrape]) -> Vec<Value> {
    let mut series = Vec::new();
    for s in scrapes {
        let target: Vec<String> = s.target.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        for (name, labels, value) in s.text.lines().filter_map(sample) {
            if !value.is_finite() {
                continue;
            }
            let all: Vec<&str> = [labels]
                .into_iter()
                .filter(|l| !l.is_empty())
                .chain(target.iter().map(String::as_str))
                .collect();
            series.push(json!({
                "series": format!("{name}{{{}}}", all.join(",")),
                "values": format!("{value}x{STEPS}"),
            }));
        }
    }
    series
}

/// Every series selector of `expr` that names an `ingest_` metric, with its
/// braces (`ingest_operator_drains{phase="TimedOut"}`).
pub fn selectors(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("ingest_").map(|i| from + i) {
        let starts_word = expr[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        let name_len = expr[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len() - at);
        let mut end = at + name_len;
        if expr[end..].starts_with('{')
            && let Some(close) = closing_brace(expr, end)
        {
            end = close + 1;
        }
        if starts_word {
            found.push(expr[at..end].to_owned());
        }
        from = end.max(at + 1);
    }
    found
}

/// The dashboard's queries (every panel target's `expr`).
pub fn dashboard_queries(dashboard: &str) -> Result<Vec<String>> {
    let dash: Value = serde_json::from_str(dashboard).context("dashboard JSON")?;
    let panels = dash["panels"].as_array().context("dashboard has no panels")?;
    let queries: Vec<String> = panels
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    if queries.is_empty() {
        bail!("the dashboard has no queries");
    }
    Ok(queries)
}

/// The `groups:` of the PrometheusRule in `helm template` output, as a
/// Prometheus rule file (the text under `spec:`, one level less indented).
pub fn rule_file(rendered: &str) -> Result<String> {
    let doc = rendered
        .split("\n---")
        .find(|d| d.contains("\nkind: PrometheusRule"))
        .context("no PrometheusRule in the render")?;
    let spec = doc.split_once("\nspec:\n").context("PrometheusRule without spec")?.1;
    Ok(spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
}

/// The alert names of a rule file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

/// Writes `checks.rules.json` and `live.test.json` into `dir` (beside the
/// chart's `alerts.rules.yaml`, already there): an alert on `absent()` of
/// each query and selector, which must not fire, and each of the chart's
/// alerts, which must not fire either.
/// Returns how many queries must return data and how many series must exist.
pub fn write_test(dir: &Path, scrapes: &[Scrape], queries: &[String], alert_rules: &str) -> Result<(usize, usize)> {
    let mut checks = Vec::new();
    for q in queries
        .iter()
        .filter(|q| !EMPTY_WHEN_IDLE.iter().any(|name| q.contains(name)))
    {
        checks.push((
            format!("DashboardQueryReturnsNothing{}", checks.len()),
            expand(q),
            q.clone(),
        ));
    }
    let returning = checks.len();
    let mut seen = std::collections::BTreeSet::new();
    for s in queries
        .iter()
        .map(|q| expand(q))
        .chain([alert_rules.to_owned()])
        .flat_map(|e| selectors(&e))
    {
        if seen.insert(s.clone()) {
            checks.push((format!("SeriesMissing{}", checks.len()), s.clone(), s));
        }
    }
    let rules: Vec<Value> = checks
        .iter()
        .map(|(name, expr, shown)| json!({"alert": name, "expr": format!("absent({expr})"), "annotations": {"query": shown}}))
        .collect();
    let rule_file = json!({"groups": [{"name": "live-checks", "rules": rules}]});
    std::fs::write(dir.join("checks.rules.json"), serde_json::to_string_pretty(&rule_file)?)?;
    let quiet = checks
        .iter()
        .map(|(name, _, _)| name.clone())
        .chain(alert_names(alert_rules))
        .map(|alertname| json!({"eval_time": EVAL_AT, "alertname": alertname, "exp_alerts": []}));
    let test = json!({
        "rule_files": ["alerts.rules.yaml", "checks.rules.json"],
        "evaluation_interval": "30s",
        "tests": [{"interval": "30s", "input_series": input_series(scrapes), "alert_rule_test": quiet.collect::<Vec<_>>()}],
    });
    std::fs::write(dir.join("live.test.json"), serde_json::to_string_pretty(&test)?)?;
    Ok((returning, checks.len() - returning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_quoted_braces_and_without_labels() {
        assert_eq!(
            sample("ingest_publishes_total 7"),
            Some(("ingest_publishes_total", "", 7.0))
        );
        assert_eq!(
            sample(r#"ingest_build_info{version="0.1.0",commit="a}b \"c\""} 1"#),
            Some(("ingest_build_info", r#"version="0.1.0",commit="a}b \"c\"""#, 1.0))
        );
        assert_eq!(
            sample(r#"x_bucket{le="+Inf"} 3 1700000000"#),
            Some(("x_bucket", r#"le="+Inf""#, 3.0))
        );
        assert_eq!(sample("# TYPE x counter"), None);
        assert_eq!(sample("# EOF"), None);
    }

    #[test]
    fn series_carry_the_target_labels_and_skip_non_finite_values() {
        let target = BTreeMap::from([("pod".to_owned(), "p-1".to_owned())]);
        let text = "# TYPE a gauge\na 2.5\nb{k=\"v\"} 1\nc NaN\n".to_owned();
        let series = input_series(&[Scrape { target, text }]);
        assert_eq!(
            series,
            [
                json!({"series": "a{pod=\"p-1\"}", "values": "2.5x10"}),
                json!({"series": "b{k=\"v\",pod=\"p-1\"}", "values": "1x10"}),
            ]
        );
    }

    #[test]
    fn selectors_keep_their_matchers_and_skip_other_words() {
        let expr = r#"(ingest_operator_drains{phase="TimedOut"} and on (instance) (ingest_operator_leader == 1)) > 0
            and rate(ingest_signal_to_disconnect_seconds_bucket{namespace=~".*"}[2m]) my_ingest_x"#;
        assert_eq!(
            selectors(expr),
            [
                r#"ingest_operator_drains{phase="TimedOut"}"#,
                "ingest_operator_leader",
                r#"ingest_signal_to_disconnect_seconds_bucket{namespace=~".*"}"#,
            ]
        );
    }

    #[test]
    fn the_rule_file_is_the_spec_of_the_prometheus_rule() {
        let rendered = "---\nkind: ConfigMap\ndata: {}\n---\n# Source: x\napiVersion: monitoring.coreos.com/v1\n\
                        kind: PrometheusRule\nmetadata:\n  name: r\nspec:\n  groups:\n    - name: g\n      rules:\n        \
                        - alert: A\n          expr: up == 0\n";
        let file = rule_file(rendered).expect("a rule file");
        assert_eq!(
            file,
            "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n"
        );
        assert_eq!(alert_names(&file), ["A"]);
    }

    #[test]
    fn every_query_must_return_data_but_those_of_drains_under_way() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let queries = [
            "sum(rate(ingest_signals_total[$__rate_interval]))".to_owned(),
            "(ingest_drain_deadline_timestamp_seconds > 0) - time()".to_owned(),
        ];
        let alerts = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: ingest_signals_total > 1\n";
        let counts = write_test(dir.path(), &[], &queries, alerts).expect("written");
        assert_eq!(counts, (1, 2));
        let rules = std::fs::read_to_string(dir.path().join("checks.rules.json")).expect("rules");
        assert!(rules.contains("absent(sum(rate(ingest_signals_total[2m])))"), "{rules}");
        assert!(
            rules.contains("absent(ingest_drain_deadline_timestamp_seconds)"),
            "{rules}"
        );
        let test = std::fs::read_to_string(dir.path().join("live.test.json")).expect("test");
        assert!(
            test.contains("\"alertname\": \"A\""),
            "the chart's alerts must stay quiet too: {test}"
        );
    }

    #[test]
    fn the_dashboard_queries_are_every_target() {
        let dash = r#"{"panels": [{"type": "row"}, {"targets": [{"expr": "a"}, {"expr": "b"}]}, {"targets": [{"expr": "c"}]}]}"#;
        assert_eq!(dashboard_queries(dash).expect("queries"), ["a", "b", "c"]);
        assert!(dashboard_queries(r#"{"panels": [{"type": "row"}]}"#).is_err());
    }
}
