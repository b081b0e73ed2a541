//! The plugin's command line: `kubectl ingest status | drain | wait | cancel`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ingest_runtime::{parse_duration, parse_positive_duration};

use crate::crd::IncapablePolicy;

/// The ingest pods as the chart labels them (and the operator's default
/// `--ingest-selector`).
pub(crate) const DEFAULT_SELECTOR: &str = "app.kubernetes.io/component=ingest";

/// The longest deadline an IngestDrain takes (its CRD's rule).
const MAX_DEADLINE: Duration = Duration::from_secs(86_400);
/// The longest propagation delay an IngestDrain takes (its CRD's rule).
const MAX_PROPAGATION_DELAY: Duration = Duration::from_secs(600);

pub(crate) const EXIT_CODES: &str = "\
Exit status:
  0    done; a followed drain (--wait, wait, cancel --wait) ended as asked
  1    error: the API refused, a node, pod or drain not found, a pod's /status unreadable
  2    bad usage
  3    the drain ended TimedOut (publishers left at the deadline)
  4    the drain ended Cancelled, or was deleted
  5    the drain ended Failed
  6    --timeout passed; the drain goes on
  130  interrupted (Ctrl-C); the drain goes on";

/// Lossless drains of RTMP ingest pods, from kubectl.
///
/// Copied onto PATH as `kubectl-ingest`, it runs as `kubectl ingest`. It
/// uses your kubeconfig and reaches each ingest pod's /status through the
/// API server's pod proxy: no port-forward, no extra port.
#[derive(Debug, Parser)]
#[command(name = "kubectl-ingest", bin_name = "kubectl ingest", version, after_help = EXIT_CODES)]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Which cluster and namespace.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Cluster options")]
pub struct ClusterArgs {
    /// Namespace of the ingest pods and their IngestDrains [default: the
    /// kubeconfig context's namespace]
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig file [default: $KUBECONFIG, then ~/.kube/config]
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context [default: the current context]
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Each ingest pod: node, readiness, publishers by the signal they
    /// announced, and its drain.
    ///
    /// Reads every pod's /status through the API server's pod proxy. A pod
    /// that does not answer shows `?` (the error goes to stderr, the exit
    /// status is 1); the others are shown all the same.
    Status(StatusArgs),
    /// Drain the ingest pods of a node, or ingest pods by name.
    ///
    /// Creates an IngestDrain, which the operator carries out: each pod
    /// leaves its Service, asks capable publishers to reconnect elsewhere
    /// and is done when none is left, or at the deadline. With --wait,
    /// follows it with a live progress line until it ends.
    #[command(after_help = EXIT_CODES)]
    Drain(DrainArgs),
    /// Follow an IngestDrain until it ends, with a live progress line.
    #[command(after_help = EXIT_CODES)]
    Wait(WaitArgs),
    /// Cancel an IngestDrain: its pods serve again.
    ///
    /// Sets the drain's `spec.cancel` (what an uncordon does to a node's
    /// drain); the operator stops the pods' drains and the IngestDrain
    /// stays, Cancelled. Publishers already moved stay where they went.
    #[command(after_help = EXIT_CODES)]
    Cancel(CancelArgs),
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Ingest pods of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector of the ingest pods
    #[arg(short = 'l', long, env = "KUBECTL_INGEST_SELECTOR", default_value = DEFAULT_SELECTOR)]
    pub selector: String,
    /// The pods' HTTP port serving /status: a container port's name or number
    #[arg(long, default_value = "http")]
    pub port: String,
    /// Output format: a table, or JSON for scripts (`{"pods": [...]}`)
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(subcommand)]
    pub target: DrainTarget,
}

#[derive(Debug, Subcommand)]
pub enum DrainTarget {
    /// The ingest pods on NODE (of the namespace).
    #[command(after_help = EXIT_CODES)]
    Node {
        /// The node (`kubectl get nodes`)
        node: String,
        #[command(flatten)]
        opts: DrainOpts,
    },
    /// These ingest pods.
    #[command(after_help = EXIT_CODES)]
    Pod {
        /// Ingest pods, by name
        #[arg(required = true, value_name = "POD")]
        pods: Vec<String>,
        #[command(flatten)]
        opts: DrainOpts,
    },
}

/// The IngestDrain to create; defaults are the CRD's.
#[derive(Debug, clap::Args)]
pub struct DrainOpts {
    /// Name of the IngestDrain [default: drain-<node>-, drain-<pod>- or
    /// drain-pods-, and a suffix the API server picks]
    #[arg(long)]
    pub name: Option<String>,
    /// Label selector of the ingest pods
    #[arg(short = 'l', long, env = "KUBECTL_INGEST_SELECTOR", default_value = DEFAULT_SELECTOR)]
    pub selector: String,
    /// From the start to when publishers that announced no reconnect
    /// signal get --incapable-policy, and the pods may go anyway (1s to
    /// 24h, whole seconds)
    #[arg(long, default_value = "5m", value_parser = parse_deadline)]
    pub deadline: Duration,
    /// Reconnect signals per second on each pod; 0: no limit
    #[arg(long, default_value_t = 50.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Signalled publishers still connected at once on each pod [default: no limit]
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub max_in_flight: Option<i32>,
    /// What happens at the deadline to publishers that announced no signal
    /// (either case: `wait` or `Wait`, as an IngestDrain spells it)
    #[arg(long, value_enum, ignore_case = true, default_value_t = IncapablePolicy::Disconnect)]
    pub incapable_policy: IncapablePolicy,
    /// Evict each pod once it is drained (a node drain then needs no retry)
    #[arg(long)]
    pub evict: bool,
    /// Between leaving the Service and the first signal (0s to 10m)
    /// [default: the pod's own --propagation-delay]
    #[arg(long, value_parser = parse_propagation_delay)]
    pub propagation_delay: Option<Duration>,
    /// Where Reconnect Request sends publishers, as they reach a healthy
    /// pod: `{pod}`, `{podIP}`, `{node}`, `{nodeIP}`, `{namespace}` are
    /// replaced (rtmp://{pod}.ingest.example.com/live) [default: they
    /// reconnect to their own URL]
    #[arg(long, value_name = "URL_TEMPLATE", value_parser = parse_redirect)]
    pub redirect: Option<String>,
    /// Print the IngestDrain as YAML instead of creating it
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    #[command(flatten)]
    pub follow: FollowArgs,
}

/// Following a drain once it is created or cancelled.
#[derive(Debug, clap::Args)]
pub struct FollowArgs {
    /// Follow the drain until it ends; the exit status says how
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up following after this long (the drain goes on)
    #[arg(long, requires = "wait", value_parser = parse_positive_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The IngestDrain
    pub name: String,
    /// Give up following after this long (the drain goes on)
    #[arg(long, value_parser = parse_positive_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The IngestDrain
    pub name: String,
    #[command(flatten)]
    pub follow: FollowArgs,
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d > MAX_DEADLINE {
        return Err(format!("{s:?}: at most 24h"));
    }
    Ok(d)
}

fn parse_propagation_delay(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_PROPAGATION_DELAY {
        return Err(format!("{s:?}: at most 10m"));
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a number of signals per second (0 or more)")),
    }
}

fn parse_redirect(s: &str) -> Result<String, String> {
    if s.starts_with("rtmp://") || s.starts_with("rtmps://") {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} must start with rtmp:// or rtmps://"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(line: &str) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kubectl-ingest").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn drain_flags_go_after_the_target_and_take_the_crd_defaults() {
        let args = parse("drain pod p1 p2 --wait --timeout 2m -n live").expect("parses");
        assert_eq!(args.cluster.namespace.as_deref(), Some("live"));
        let Command::Drain(DrainArgs {
            target: DrainTarget::Pod { pods, opts },
        }) = args.command
        else {
            panic!("not a pod drain");
        };
        assert_eq!(pods, ["p1", "p2"]);
        assert_eq!(opts.deadline, Duration::from_secs(300));
        assert_eq!(opts.rate, 50.0);
        assert_eq!(opts.incapable_policy, IncapablePolicy::Disconnect);
        assert!(!opts.evict && opts.follow.wait && !opts.dry_run);
        assert_eq!(opts.follow.timeout, Some(Duration::from_secs(120)));
        assert_eq!(opts.selector, DEFAULT_SELECTOR);
    }

    #[test]
    fn bad_drain_flags_are_usage_errors() {
        for line in [
            "drain pod",
            "drain node",
            "drain node a --deadline 0s",
            "drain node a --deadline 25h",
            "drain node a --deadline 30",
            "drain node a --rate -1",
            "drain node a --max-in-flight -1",
            "drain node a --propagation-delay 11m",
            "drain node a --redirect http://x/live",
            "drain node a --incapable-policy sometimes",
            "drain node a --timeout 1m",
            "drain node a --wait --dry-run",
        ] {
            let err = parse(line).expect_err(line);
            assert_eq!(err.exit_code(), 2, "{line}: {err}");
        }
    }

    #[test]
    fn the_incapable_policy_is_taken_as_the_ingestdrain_spells_it_too() {
        for (word, want) in [
            ("wait", IncapablePolicy::Wait),
            ("Wait", IncapablePolicy::Wait),
            ("disconnect", IncapablePolicy::Disconnect),
            ("Disconnect", IncapablePolicy::Disconnect),
        ] {
            let line = format!("drain node a --incapable-policy {word}");
            let args = parse(&line).unwrap_or_else(|err| panic!("{line}: {err}"));
            let Command::Drain(DrainArgs {
                target: DrainTarget::Node { opts, .. },
            }) = args.command
            else {
                panic!("not a node drain");
            };
            assert_eq!(opts.incapable_policy, want, "{line}");
        }
    }

    #[test]
    fn status_defaults() {
        let args = parse("status -A").expect("parses");
        let Command::Status(s) = args.command else {
            panic!("not status");
        };
        assert!(s.all_namespaces);
        assert_eq!((s.selector.as_str(), s.port.as_str()), (DEFAULT_SELECTOR, "http"));
    }

    #[test]
    fn help_lists_the_exit_codes() {
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("130  interrupted"), "{help}");
        let mut cmd = Args::command();
        let drain = cmd.find_subcommand_mut("drain").expect("drain");
        let help = drain.render_long_help().to_string();
        assert!(help.contains("3    the drain ended TimedOut"), "{help}");
    }
}
