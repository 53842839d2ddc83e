//! Where the Kubernetes test binaries are: environment overrides, else the cache that
//! scripts/kube-build.sh fills (built from Debian's source package on first use).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The version scripts/kube-build.sh builds and caches.
pub const KUBE_VERSION: &str = "1.20.2";

/// The programs a test cluster runs.
#[derive(Clone, Debug)]
pub struct KubeBinaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub kubectl: PathBuf,
}

/// Environment variables that override each binary (e.g. another Kubernetes version).
pub const ENV_ETCD: &str = "COMB_ETCD";
pub const ENV_APISERVER: &str = "COMB_KUBE_APISERVER";
pub const ENV_CONTROLLER_MANAGER: &str = "COMB_KUBE_CONTROLLER_MANAGER";
pub const ENV_KUBECTL: &str = "COMB_KUBECTL";
/// Root of the build cache (default /var/cache/comb), as in scripts/kube-build.sh.
pub const ENV_CACHE: &str = "COMB_KUBE_CACHE";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kube-build.sh")
}

impl KubeBinaries {
    /// Overrides first; the cache otherwise, built by scripts/kube-build.sh when a cached
    /// binary is missing and no override names it (about 10 minutes, once per machine).
    pub fn locate() -> Result<Self> {
        let cache = std::env::var_os(ENV_CACHE)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/comb"))
            .join(format!("kubernetes-{KUBE_VERSION}/bin"));
        let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let pick = |name: &str, file: &str| env(name).unwrap_or_else(|| cache.join(file));
        let mut bins = KubeBinaries {
            etcd: env(ENV_ETCD).unwrap_or_else(|| PathBuf::from("/usr/bin/etcd")),
            apiserver: pick(ENV_APISERVER, "kube-apiserver"),
            controller_manager: pick(ENV_CONTROLLER_MANAGER, "kube-controller-manager"),
            kubectl: pick(ENV_KUBECTL, "kubectl"),
        };
        let missing = |b: &KubeBinaries| {
            [&b.etcd, &b.apiserver, &b.controller_manager, &b.kubectl]
                .into_iter()
                .filter(|p| !p.is_file())
                .cloned()
                .collect::<Vec<_>>()
        };
        if !missing(&bins).is_empty() {
            let out = Command::new("bash")
                .arg(script())
                .output()
                .with_context(|| format!("running {}", script().display()))?;
            if !out.status.success() {
                bail!(
                    "{} failed:\n{}",
                    script().display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The script also installs etcd-server.
            bins.etcd = env(ENV_ETCD).unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        }
        let still = missing(&bins);
        if !still.is_empty() {
            bail!("Kubernetes test binaries missing: {still:?} (see docs/kubernetes.md)");
        }
        Ok(bins)
    }
}
