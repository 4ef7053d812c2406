//! Where an IPN's wall time went during a phase, from the workers' own histograms
//! (`ipn_worker_step_seconds`, `ipn_worker_verify_seconds`, `ipn_worker_database_batch_*`):
//! their sums and counts scraped before and after the phase, the differences added over the
//! workers.

use std::collections::BTreeMap;

use ipn_bridge::worker::metrics::ChainStep;

use super::ChildProcess;

/// A histogram's `_sum` and `_count` per label set (`""` when it has none).
type SumsAndCounts = BTreeMap<String, (f64, f64)>;

/// The histograms of one scrape of every worker, added together.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    steps: SumsAndCounts,
    postback: SumsAndCounts,
    batch_size: SumsAndCounts,
    batch_seconds: SumsAndCounts,
}

impl Scrape {
    /// Reads every worker's `/metrics`.
    pub async fn of(workers: &[ChildProcess]) -> anyhow::Result<Scrape> {
        let mut scrape = Scrape::default();
        for worker in workers {
            let text = worker.metrics().await?;
            add(&mut scrape.steps, &text, "ipn_worker_step_seconds");
            add(&mut scrape.postback, &text, "ipn_worker_verify_seconds");
            add(
                &mut scrape.batch_size,
                &text,
                "ipn_worker_database_batch_size",
            );
            add(
                &mut scrape.batch_seconds,
                &text,
                "ipn_worker_database_batch_seconds",
            );
        }
        Ok(scrape)
    }

    /// Two lines: the mean milliseconds an IPN spent in each step between `before` and this
    /// scrape, and the database batches' mean size and duration.
    pub fn report_since(&self, before: &Scrape) -> String {
        let steps = means(&self.steps, &before.steps);
        let postback = means(&self.postback, &before.postback);
        let step = |step: ChainStep| {
            let label = format!("step=\"{}\"", step.as_str());
            (step.as_str(), steps.get(&label).copied())
        };
        // The chain's order, the postback (its own histogram) after the gate.
        let mut chain: Vec<_> = ChainStep::ALL.into_iter().map(step).collect();
        chain.insert(1, ("postback", postback.get("").copied()));
        let mut parts = Vec::new();
        let mut total = 0.0;
        for (name, mean) in chain {
            if let Some((seconds, _)) = mean {
                total += seconds;
                parts.push(format!("{name} {:.1}", seconds * 1000.0));
            }
        }
        let sizes = means(&self.batch_size, &before.batch_size);
        let seconds = means(&self.batch_seconds, &before.batch_seconds);
        let batches: Vec<String> = sizes
            .iter()
            .map(|(label, (size, batches))| {
                let statement = label
                    .strip_prefix("statement=\"")
                    .and_then(|rest| rest.strip_suffix('"'))
                    .unwrap_or(label);
                let ms = seconds.get(label).map_or(0.0, |(s, _)| s * 1000.0);
                format!("{statement} {size:.1} in {ms:.1} ms ({batches:.0} batches)")
            })
            .collect();
        format!(
            "wall ms per IPN by step while draining (the workers' histograms, means): {} (sum {:.1})\ndatabase batches while draining (mean requests per batch in mean ms): {}",
            parts.join(", "),
            total * 1000.0,
            batches.join("; ")
        )
    }
}

/// The mean per label set of the observations between two scrapes, with their number.
fn means(after: &SumsAndCounts, before: &SumsAndCounts) -> BTreeMap<String, (f64, f64)> {
    after
        .iter()
        .filter_map(|(label, (sum, count))| {
            let (sum0, count0) = before.get(label).copied().unwrap_or_default();
            let observed = count - count0;
            (observed > 0.0).then(|| (label.clone(), ((sum - sum0) / observed, observed)))
        })
        .collect()
}

/// Adds the `<name>_sum` and `<name>_count` series of `text` into `into`.
fn add(into: &mut SumsAndCounts, text: &str, name: &str) {
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some(rest) = series.strip_prefix(name) else {
            continue;
        };
        let (is_sum, labels) = if let Some(labels) = rest.strip_prefix("_sum") {
            (true, labels)
        } else if let Some(labels) = rest.strip_prefix("_count") {
            (false, labels)
        } else {
            continue;
        };
        let labels = labels
            .strip_prefix('{')
            .and_then(|l| l.strip_suffix('}'))
            .unwrap_or(labels);
        let entry = into.entry(labels.to_owned()).or_default();
        if is_sum {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
}
