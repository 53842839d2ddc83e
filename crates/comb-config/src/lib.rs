//! Comb's config sources: a directory of Kubernetes manifests (later the Kubernetes API)
