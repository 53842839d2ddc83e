//! The certificate reconciler (docs/mtls.md): keeps one workload certificate per identity
//! the node needs in the [`CertStore`] the proxy reads.
//!
//! One way in: after every step the writer sends the wanted identities
//! (`Desired.mesh.identities`) on a watch channel, which never blocks it. This task, on the
//! agent's runtime, does the network: for each identity a fresh ECDSA P-256 key made in
//! memory, a CSR to the CA, the reply checked and the whole set swapped in. Renewal at
//! half-life (minus up to 5 % of the lifetime, so a node's certificates do not all renew
//! at once); retries with exponential backoff (1 s doubling to 30 s, at most a quarter of the
//! lifetime) while the CA fails;
//! a certificate keeps being offered until it expires, then it leaves the store (and shows
//! `expired`); identities no longer wanted leave at once. What it holds is published for
//! `comb status` and `comb cert list` (its own board: readers never wait for it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use comb_api::{CertRow, CertsSummary};
use comb_ca::CaClient;
use comb_identity::pem_util::certs_from_pem;
use comb_identity::{CertSet, CertStore, SpiffeId, WorkloadCert, key_and_csr};
use tokio::sync::watch;

use crate::config::CertsConfig;

/// What the reconciler publishes.
#[derive(Clone, Debug, Default)]
pub struct CertsPublished {
    pub summary: CertsSummary,
    pub rows: Vec<CertRow>,
}

pub type CertBoard = Arc<ArcSwap<CertsPublished>>;

/// The writer's end: the identities wanted now.
pub type Wanted = watch::Sender<BTreeSet<SpiffeId>>;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A new board: disabled (no CA) until [`run`] says otherwise.
pub fn board(enabled: Option<&CertsConfig>) -> CertBoard {
    Arc::new(ArcSwap::from_pointee(CertsPublished {
        summary: CertsSummary {
            enabled: enabled.is_some(),
            ca: enabled.map(|c| c.ca_address.clone()),
            ..Default::default()
        },
        rows: vec![],
    }))
}

#[derive(Default)]
struct Entry {
    cert: Option<Arc<WorkloadCert>>,
    /// When to ask the CA next (renewal due, or the next retry).
    next_try: Option<SystemTime>,
    failures: u32,
    last_error: Option<String>,
}

struct Reconciler {
    cfg: CertsConfig,
    store: CertStore,
    board: CertBoard,
    roots: Vec<Vec<u8>>,
    /// The client, with the token and root text it was made with.
    client: Option<(String, String, CaClient)>,
    entries: BTreeMap<SpiffeId, Entry>,
    failing_since: Option<SystemTime>,
    unreachable: bool,
    last_error: Option<String>,
}

/// Runs until the writer's end is dropped.
pub async fn run(
    cfg: CertsConfig,
    store: CertStore,
    board: CertBoard,
    mut wanted: watch::Receiver<BTreeSet<SpiffeId>>,
) {
    let mut r = Reconciler {
        cfg,
        store,
        board,
        roots: vec![],
        client: None,
        entries: BTreeMap::new(),
        failing_since: None,
        unreachable: false,
        last_error: None,
    };
    loop {
        let want = wanted.borrow_and_update().clone();
        r.want(&want);
        r.work().await;
        r.publish();
        let sleep = r.next_wakeup().map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(50))
        });
        let sleep = sleep.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            changed = wanted.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Half-life minus up to 5 % of the lifetime; never before half of what was left when it
/// arrived (a backdated not-before or a skewed clock must not make it due at once).
fn renewal_time(cert: &WorkloadCert, received: SystemTime) -> SystemTime {
    let life = cert
        .info
        .not_after
        .duration_since(cert.info.not_before)
        .unwrap_or_default();
    let jitter = life.mul_f64(rand::random::<f64>() * 0.05);
    let left = cert
        .info
        .not_after
        .duration_since(received)
        .unwrap_or_default();
    (cert.info.half_life() - jitter).max(received + left.mul_f64(0.45))
}

/// 1 s doubling, capped at 30 s and at a quarter of the certificate lifetime (a short-lived
/// certificate must not expire while the agent waits out a long backoff).
fn backoff(failures: u32, ttl: Duration) -> Duration {
    let d = BACKOFF_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_MAX)
        .min((ttl / 4).max(BACKOFF_FIRST));
    // ±20 % so nodes that lost the CA together do not come back together.
    d.mul_f64(0.8 + rand::random::<f64>() * 0.4)
}

impl Reconciler {
    fn want(&mut self, want: &BTreeSet<SpiffeId>) {
        let before = self.entries.len();
        self.entries.retain(|id, _| want.contains(id));
        if self.entries.len() != before {
            tracing::info!(
                removed = before - self.entries.len(),
                "workload certificates no longer needed"
            );
            self.swap();
        }
        for id in want {
            self.entries.entry(id.clone()).or_default();
        }
    }

    fn next_wakeup(&self) -> Option<SystemTime> {
        self.entries
            .values()
            .flat_map(|e| {
                let expiry = e
                    .cert
                    .as_ref()
                    .map(|c| c.info.not_after)
                    .filter(|t| *t > SystemTime::now());
                [e.next_try, expiry]
            })
            .flatten()
            .min()
    }

    /// The token and the root are read before every round (a rotated token or root takes
    /// effect); the client, and its connection, is kept while neither changed.
    fn load_client(&mut self) -> Result<CaClient, String> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read_to_string(p)
                .map_err(|e| format!("reading the CA {what} {}: {e}", p.display()))
        };
        let token = read(&self.cfg.token_file, "token")?.trim().to_string();
        let root = read(&self.cfg.ca_root_cert, "root")?;
        if let Some((t, r, c)) = &self.client
            && *t == token
            && *r == root
        {
            return Ok(c.clone());
        }
        self.roots = certs_from_pem(&root)
            .map_err(|e| format!("{}: {e}", self.cfg.ca_root_cert.display()))?;
        let c = CaClient::new(&self.cfg.ca_address, &root, &token).map_err(|e| e.to_string())?;
        self.client = Some((token, root, c.clone()));
        self.swap(); // the proxy trusts the new roots at once
        Ok(c)
    }

    /// Ask the CA for every certificate that is due; stop the round at the first sign that
    /// the CA is unreachable (the rest back off with the same error).
    async fn work(&mut self) {
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                (e.cert.is_none() && e.next_try.is_none()) || e.next_try.is_some_and(|t| t <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let client = match self.load_client() {
            Ok(c) => c,
            Err(e) => {
                for id in &due {
                    self.failed(id, e.clone(), false);
                }
                return;
            }
        };
        let mut changed = false;
        let mut down: Option<String> = None;
        for id in due {
            if let Some(err) = &down {
                self.failed(&id, err.clone(), true);
                continue;
            }
            match self.obtain(&client, &id).await {
                Ok(cert) => {
                    tracing::info!(
                        identity = %id,
                        serial = %cert.info.serial,
                        not_after = unix(cert.info.not_after),
                        "workload certificate issued"
                    );
                    let e = self.entries.get_mut(&id).expect("due entry");
                    e.next_try = Some(renewal_time(&cert, SystemTime::now()));
                    e.cert = Some(Arc::new(cert));
                    e.failures = 0;
                    e.last_error = None;
                    self.failing_since = None;
                    self.unreachable = false;
                    self.last_error = None;
                    changed = true;
                }
                Err((msg, unreachable)) => {
                    if unreachable {
                        down = Some(msg.clone());
                    }
                    self.failed(&id, msg, unreachable);
                }
            }
        }
        if changed {
            self.swap();
        }
    }

    async fn obtain(
        &self,
        client: &CaClient,
        id: &SpiffeId,
    ) -> Result<WorkloadCert, (String, bool)> {
        let kc = key_and_csr(id).map_err(|e| (e.to_string(), false))?;
        let chain = client
            .create_certificate(&kc.csr_pem, self.cfg.ttl)
            .await
            .map_err(|e| {
                let unreachable = e.is_unreachable();
                (e.to_string(), unreachable)
            })?;
        WorkloadCert::from_pem_chain(id, &chain, kc.key_pkcs8).map_err(|e| (e.to_string(), false))
    }

    fn failed(&mut self, id: &SpiffeId, msg: String, unreachable: bool) {
        let now = SystemTime::now();
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        e.failures += 1;
        e.next_try = Some(now + backoff(e.failures, self.cfg.ttl));
        if e.last_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(identity = %id, error = %msg, failures = e.failures, "obtaining a workload certificate failed; retrying");
        }
        e.last_error = Some(msg.clone());
        self.failing_since.get_or_insert(now);
        self.unreachable = unreachable;
        self.last_error = Some(msg);
    }

    /// The store gets the certificates valid now, as one new set.
    fn swap(&mut self) {
        let now = SystemTime::now();
        let cur = self.store.load();
        let certs = self
            .entries
            .iter()
            .filter_map(|(id, e)| {
                let c = e.cert.as_ref()?;
                (c.info.not_after > now).then(|| (id.clone(), c.clone()))
            })
            .collect();
        self.store.store(Arc::new(CertSet {
            generation: cur.generation + 1,
            roots: self.roots.clone(),
            certs,
        }));
    }

    fn publish(&mut self) {
        let now = SystemTime::now();
        // Expired certificates leave the store.
        let held = self.store.load();
        if held.certs.values().any(|c| c.info.not_after <= now) {
            tracing::warn!("a workload certificate expired");
            self.swap();
        }
        let rows: Vec<CertRow> = self
            .entries
            .iter()
            .map(|(id, e)| {
                let state = match &e.cert {
                    None => "pending",
                    Some(c) if c.info.not_after <= now => "expired",
                    Some(_) if e.next_try.is_some_and(|t| t <= now) || e.failures > 0 => "renewing",
                    Some(_) => "valid",
                };
                CertRow {
                    identity: id.to_string(),
                    serial: e.cert.as_ref().map(|c| c.info.serial.clone()),
                    not_before: e.cert.as_ref().map(|c| unix(c.info.not_before)),
                    not_after: e.cert.as_ref().map(|c| unix(c.info.not_after)),
                    state: state.into(),
                    last_error: e.last_error.clone(),
                }
            })
            .collect();
        let valid: Vec<&CertRow> = rows
            .iter()
            .filter(|r| r.state == "valid" || r.state == "renewing")
            .collect();
        let summary = CertsSummary {
            enabled: true,
            ca: Some(self.cfg.ca_address.clone()),
            wanted: rows.len(),
            valid: valid.len(),
            failing_since: self.failing_since.map(unix),
            unreachable: self.failing_since.is_some() && self.unreachable,
            last_error: self.last_error.clone(),
            valid_until: valid
                .iter()
                .filter_map(|r| r.not_after)
                .min_by(|a, b| a.total_cmp(b)),
        };
        self.board.store(Arc::new(CertsPublished { summary, rows }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_ca::{CaConfig, CaServer};

    const TOKEN: &str = "token-of-node-n1-0123456789";

    async fn ca(dir: &std::path::Path, listen: &str) -> CaServer {
        CaServer::start(CaConfig {
            listen: listen.parse().unwrap(),
            dir: dir.join("ca"),
            cacerts: None,
            callers: comb_ca::Callers::Files {
                tokens: dir.join("tokens"),
                manifests: dir.join("manifests"),
            },
            trust_domain: "cluster.local".into(),
            max_ttl: Duration::from_secs(3600),
            serving_dns: Vec::new(),
            kube_keys: None,
        })
        .await
        .unwrap()
    }

    async fn until(what: &str, board: &CertBoard, f: impl Fn(&CertsPublished) -> bool) {
        for _ in 0..200 {
            if f(&board.load()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}: {:?}", board.load());
    }

    /// The reconciler against an in-process CA: issue, rotate without a gap, expire while
    /// the CA is away, recover, drop an identity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn issue_rotate_expire_recover_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("manifests")).unwrap();
        std::fs::write(
            d.join("manifests/pods.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: a}\nspec:\n  nodeName: n1\n  serviceAccountName: client\n  containers: [{name: c, image: x}]\n",
        )
        .unwrap();
        std::fs::write(d.join("tokens"), format!("{TOKEN} n1\n")).unwrap();
        std::fs::write(d.join("n1.token"), TOKEN).unwrap();
        let server = ca(d, "127.0.0.1:0").await;
        let addr = server.local_addr;
        let cfg = CertsConfig {
            ca_address: addr.to_string(),
            ca_root_cert: d.join("ca/root-cert.pem"),
            token_file: d.join("n1.token"),
            ttl: Duration::from_secs(4),
        };
        let store = comb_identity::store::new_store();
        let board = board(Some(&cfg));
        let (tx, rx) = watch::channel(BTreeSet::new());
        let task = tokio::spawn(run(cfg, store.clone(), board.clone(), rx));
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        tx.send(BTreeSet::from([id.clone()])).unwrap();
        until("a valid certificate", &board, |b| {
            b.rows.len() == 1 && b.rows[0].state == "valid"
        })
        .await;
        let set = store.load();
        let first = set.get(&id).unwrap().info.serial.clone();
        assert_eq!(set.roots.len(), 1);
        assert_eq!(board.load().summary.valid, 1);

        // Renewed at half-life: a new serial, the old one in the store until then.
        until("rotation", &board, |b| {
            let held = store.load();
            assert!(held.get(&id).is_some(), "gap during rotation");
            b.rows[0].serial.as_deref() != Some(first.as_str())
        })
        .await;

        // The CA goes away for longer than the lifetime.
        server.shutdown().await.unwrap();
        until("expiry with the CA away", &board, |b| {
            b.rows[0].state == "expired"
        })
        .await;
        assert!(
            store.load().get(&id).is_none(),
            "an expired certificate is not offered"
        );
        let s = board.load().summary.clone();
        assert!(
            s.failing_since.is_some() && s.unreachable && s.valid == 0,
            "{s:?}"
        );

        // Back on the same address: recovery.
        let server = ca(d, &addr.to_string()).await;
        until("recovery", &board, |b| b.rows[0].state == "valid").await;
        assert!(board.load().summary.failing_since.is_none());

        // Not wanted any more: gone from the store and the rows.
        tx.send(BTreeSet::new()).unwrap();
        until("the identity dropped", &board, |b| b.rows.is_empty()).await;
        assert!(store.load().certs.is_empty());
        drop(tx);
        task.await.unwrap();
        server.shutdown().await.unwrap();
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let day = Duration::from_secs(86_400);
        let b1 = backoff(1, day);
        assert!(b1 >= Duration::from_millis(800) && b1 <= Duration::from_millis(1200));
        let b3 = backoff(3, day);
        assert!(b3 >= Duration::from_millis(3200) && b3 <= Duration::from_millis(4800));
        assert!(backoff(40, day) <= BACKOFF_MAX.mul_f64(1.2));
        assert!(backoff(40, Duration::from_secs(20)) <= Duration::from_secs(6));
    }
}
