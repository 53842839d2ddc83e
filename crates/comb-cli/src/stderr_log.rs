//! Logging of the long-running subcommands (`comb ca`, `comb lab kubelet`): plain text on
//! stderr, level from `COMB_LOG` (default info).

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
