//! `comb cni install|uninstall`: chain the comb-cni plugin into a node's CNI configuration
//! and take it out again (the DaemonSet's `install-cni` init container; comb_cni::install).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};

#[derive(clap::Subcommand)]
pub enum CniCmd {
    /// Copy the plugin into the CNI binary directory and append it to the primary
    /// configuration (the first file of the configuration directory). Idempotent.
    Install {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The plugin binary [default: comb-cni beside this program].
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Where the plugin reports sandboxes (combd's --cni-spool).
        #[arg(long, default_value = comb_cni::DEFAULT_SPOOL_DIR)]
        spool_dir: PathBuf,
    },
    /// Take the plugin out of every configuration and remove its binary. Idempotent.
    Uninstall {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

pub fn run(cmd: CniCmd) -> Result<ExitCode> {
    match cmd {
        CniCmd::Install {
            conf_dir,
            bin_dir,
            plugin,
            spool_dir,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("locating this program")?
                    .with_file_name(comb_cni::PLUGIN_TYPE),
            };
            let file = comb_cni::install::install(&conf_dir, &bin_dir, &plugin, &spool_dir)
                .map_err(|e| anyhow!("installing comb-cni: {e}"))?;
            println!("comb-cni chained in {}", file.display());
        }
        CniCmd::Uninstall { conf_dir, bin_dir } => {
            let changed = comb_cni::install::uninstall(&conf_dir, &bin_dir)
                .map_err(|e| anyhow!("uninstalling comb-cni: {e}"))?;
            for f in changed {
                println!("comb-cni removed from {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
