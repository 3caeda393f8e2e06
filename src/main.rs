//! The `cutover-proxy` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Measured in bench/: ~10 % less CPU per proxied request than glibc malloc, same idle memory.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (its weak `malloc_conf`, under the crate's prefix; a
/// pointer to the first byte of a NUL-terminated string). Pingora allocates a 64 KiB buffer for
/// every upstream answer's body and frees it at the end: jemalloc's thread cache keeps blocks of
/// up to 32 KiB by default, so each of those went to the shared arena and back. Cached per
/// thread up to 64 KiB, they are reused without it (Pingora's passthrough path about 3,000
/// instructions fewer a request, under callgrind).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"tcache_max:65536\0"[0];
use cutover_proxy::core::config::Config;

#[derive(Parser)]
#[command(
    name = "cutover-proxy",
    version,
    about = "Moves chat traffic from a legacy Chat API to a runtime orchestrator, one organisation at a time"
)]
struct Cli {
    /// Path of proxy.toml (default: proxy.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and exit: 0 when valid, 1 with the offending key otherwise.
    Check,
    /// Start demo upstreams (a legacy Chat API and a runtime) and the proxy in front of them.
    Demo,
    /// Where each org stands across the fleet, read from Prometheus, and the config that
    /// moves the ready ones.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Per org the fleet has seen: its mode, shadow samples, verdict and reasons ([shadow] and
    /// breaker.window_secs of --config, or of ./proxy.toml, or the defaults).
    Status {
        /// The Prometheus that scrapes every replica, e.g. http://prometheus.monitoring:9090.
        #[arg(long)]
        prometheus: String,
        /// Print {"orgs":[S...]}, S as in GET /runtime/shadow, over every replica.
        #[arg(long)]
        json: bool,
        /// PromQL label matchers naming this deployment's series, e.g. 'namespace="prod"'.
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// The --config file with every ready shadow org moved to runtime_orgs, as a unified diff;
    /// empty when none is ready. FILE itself is changed only when --write names it.
    Plan {
        #[arg(long)]
        prometheus: String,
        /// Write the promoted config here (the diff is printed as well).
        #[arg(long, value_name = "OUT")]
        write: Option<PathBuf>,
        #[arg(long, default_value = "")]
        selector: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let given = cli.config.clone();
    let path = cli.config.unwrap_or_else(|| PathBuf::from("proxy.toml"));
    match cli.command {
        Some(Command::Check) => match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
        Some(Command::Demo) => {
            cutover_proxy::app::logging::init();
            cutover_proxy::app::demo::run(&path)
        }
        Some(Command::Rollout { command }) => match command {
            RolloutCommand::Status {
                prometheus,
                json,
                selector,
            } => {
                cutover_proxy::app::rollout::status(given.as_deref(), &prometheus, &selector, json)
            }
            RolloutCommand::Plan {
                prometheus,
                write,
                selector,
            } => cutover_proxy::app::rollout::plan(&path, &prometheus, &selector, write.as_deref()),
        },
        None => {
            cutover_proxy::app::logging::init();
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            };
            cutover_proxy::app::run(path, config)
        }
    }
}
