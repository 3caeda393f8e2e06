//! Log output: JSON lines when stdout is not a terminal (what log shippers want), human-readable
//! otherwise; the level comes from `RUST_LOG` (default `info`, Pingora's own chatter at `warn`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    // Pingora narrates its own start-up and shutdown at info; keep its warnings and errors.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if std::io::stdout().is_terminal() {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
}
