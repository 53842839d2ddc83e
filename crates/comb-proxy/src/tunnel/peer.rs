//! The identity a tunnel's client proved with its certificate, as policy and telemetry use
//! it.

use std::sync::Arc;

use comb_identity::SpiffeId;
use comb_model::l7::Authenticated;

/// The identity a tunnel's client proved, as policy and telemetry use it.
#[derive(Clone, Debug)]
pub struct TunnelPeer {
    pub identity: SpiffeId,
    /// `<td>/ns/<ns>/sa/<sa>`.
    pub principal: String,
}

impl TunnelPeer {
    pub fn new(identity: SpiffeId) -> Self {
        Self {
            principal: identity.principal(),
            identity,
        }
    }

    /// The source telemetry names: the workload at the source address when it has the
    /// certificate's identity, else one known only by that identity.
    pub fn source_workload(
        &self,
        by_address: Option<Arc<comb_model::l7::Workload>>,
    ) -> Arc<comb_model::l7::Workload> {
        match by_address {
            Some(w) if w.principal == self.principal => w,
            _ => Arc::new(comb_model::l7::Workload {
                pod: comb_model::ObjKey::new(&self.identity.namespace, "unknown"),
                workload: "unknown".into(),
                namespace: self.identity.namespace.clone(),
                service_account: self.identity.service_account.clone(),
                principal: self.principal.clone(),
                canonical_service: "unknown".into(),
                canonical_revision: "unknown".into(),
                identity: 0,
            }),
        }
    }

    pub fn authenticated(&self) -> Authenticated<'_> {
        Authenticated {
            principal: &self.principal,
            namespace: &self.identity.namespace,
        }
    }
}
