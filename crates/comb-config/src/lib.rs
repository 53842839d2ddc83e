//! Comb's config sources: a directory of Kubernetes manifests, and objects read from the
//! Kubernetes API ([`api`]), through one parse, validation and conversion path.
//!
//! Pipeline: text → YAML documents → JSON data model → k8s-openapi types, or our own
//! [`istio`] types for Istio CRDs (with field paths in errors and unknown fields refused) → cross-object validation → [`comb_model::Snapshot`].
//! Every step collects all errors so one run shows every problem, each naming file, document
//! number and field.
#![forbid(unsafe_code)]

pub mod api;
mod convert;
mod convert_policy;
mod dir_cache;
mod error;
pub mod istio;
pub mod istio_peer_auth;
mod object;
mod parse;
mod snapshot;
mod unknown_fields;
pub mod writer;

pub use convert::{DEFAULT_AFFINITY_TIMEOUT_SECS, LABEL_SERVICE_NAME};
pub use dir_cache::DirCache;
pub use error::{ConfigError, ConfigErrors};
pub use object::{Document, Object};
pub use parse::{load_dir, manifest_files, parse_file_text};
pub use snapshot::{DEFAULT_NAMESPACE, build_snapshot, load_snapshot};
pub use writer::{to_yaml_documents, write_manifest_file};

/// Re-exported so callers build objects with the same k8s-openapi version we parse.
pub use k8s_openapi;

#[cfg(test)]
mod test_util;
