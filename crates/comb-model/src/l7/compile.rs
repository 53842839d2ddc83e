//! State → [`ProxyTable`].
// INTERFACE PLACEHOLDER: helper A replaces the bodies.

use crate::identity::IdentityTable;
use crate::objects::Snapshot;

use super::{L7Endpoint, ProxyTable, ServiceRef};

/// The proxy table of node `node`.
pub fn compile_proxy_table(
    _snapshot: &Snapshot,
    _generation: u64,
    _identities: &IdentityTable,
    _node: &str,
) -> ProxyTable {
    todo!()
}

pub(super) fn destination_service<'a>(
    _ep: &'a L7Endpoint,
    _port: u16,
    _host_header: Option<&str>,
) -> Option<&'a ServiceRef> {
    todo!()
}
