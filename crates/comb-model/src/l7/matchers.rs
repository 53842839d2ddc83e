//! Istio string matchers (exact, `prefix*`, `*suffix`, `*`), hosts and paths.
