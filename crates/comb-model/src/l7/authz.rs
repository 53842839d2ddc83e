//! Compiled AuthorizationPolicy rules of one workload and their evaluation.
// INTERFACE PLACEHOLDER: helper A replaces the bodies.

use super::{Decision, Request};

/// The AuthorizationPolicies selecting one workload, compiled for per-request evaluation.
#[derive(Clone, Debug, Default)]
pub struct Authz {}

impl Authz {
    /// True when no ALLOW, DENY or AUDIT policy selects the workload.
    pub fn is_empty(&self) -> bool {
        todo!()
    }

    /// Istio's order: DENY, then ALLOW; AUDIT marks.
    pub fn evaluate(&self, _req: &Request<'_>) -> Decision {
        todo!()
    }
}
