//! The metric names the docs use, checked against what `/metrics` exports
//! (the chart scenario scrapes a live pod and operator).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};

/// Words of the docs that start like a metric and are not one: crates,
/// template variables.
pub const NOT_METRICS: [&str; 8] = [
    "ingest_pod",
    "ingest_proto",
    "ingest_runtime",
    "ingest_rtmp",
    "ingest_operator",
    "ingest_testkit",
    "ingest_e2e",
    "ingest_labels",
];

/// The series names `/metrics` text can carry, from its `# TYPE` lines (a
/// family with no sample yet shows only those): counters as `_total`,
/// histograms with `_bucket`, `_sum` and `_count`.
pub fn exported(text: &str, into: &mut BTreeSet<String>) {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        into.insert(name.to_owned());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[],
        };
        into.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
}

/// Every `ingest_*` word of the README, the CHANGELOG, the e2e README and
/// the chart, with the file it is in.
pub fn documented(root: &Path) -> Result<Vec<(String, String)>> {
    let mut files = vec![
        root.join("README.md"),
        root.join("CHANGELOG.md"),
        root.join("e2e/README.md"),
    ];
    let mut dirs = vec![root.join("charts")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let shown = file.strip_prefix(root).unwrap_or(Path::new("?")).display().to_string();
        names.extend(named_in(&text).into_iter().map(|n| (n, shown.clone())));
    }
    Ok(names)
}

/// The `ingest_*` words of `text` that are not in [`NOT_METRICS`].
pub fn named_in(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("ingest_") {
        let starts_word = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        let word: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if starts_word && !NOT_METRICS.contains(&word.as_str()) {
            names.push(word);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_follow_the_metric_types() {
        let text = "# HELP ingest_publish_auth Publish callbacks\n# TYPE ingest_publish_auth counter\n\
                    # TYPE ingest_relay_budget_bytes gauge\ningest_relay_budget_bytes 5\n\
                    # TYPE ingest_operator_webhook_duration_seconds histogram\n";
        let mut names = BTreeSet::new();
        exported(text, &mut names);
        for want in [
            "ingest_publish_auth_total",
            "ingest_relay_budget_bytes",
            "ingest_operator_webhook_duration_seconds",
            "ingest_operator_webhook_duration_seconds_bucket",
        ] {
            assert!(names.contains(want), "{want}: {names:?}");
        }
        assert!(!names.contains("ingest_relay_budget_bytes_total"));
    }

    #[test]
    fn metric_words_are_found_and_crates_are_not() {
        let text = "watch `ingest_relay_dropped_bytes_total`, or ingest_pod::server and {{ ingest_labels }};\n\
                    not a word: my_ingest_thing; rate(ingest_signals_total[5m])";
        assert_eq!(
            named_in(text),
            ["ingest_relay_dropped_bytes_total", "ingest_signals_total"]
        );
    }
}
