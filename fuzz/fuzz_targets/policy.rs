//! The policy kinds' validation, fuzzed below the document header: the input is the `spec`
//! of a NetworkPolicy, of an AuthorizationPolicy (both apiVersions) and of a PeerAuthentication, so every run reaches
//! their validation instead of first having to stumble on a valid `apiVersion`/`kind` pair.
//! Same property as `manifest`: no panic, and what parses round-trips unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod round_trip;

const HEADERS: &[&str] = &[
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: fuzz, namespace: apps}\n",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fuzz, namespace: apps}\n",
    "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: fuzz}\n",
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: fuzz, namespace: istio-system}\n",
];

fuzz_target!(|text: &str| {
    // Indented under `spec:`, so block and flow input both nest; a `---` line in the input
    // becomes part of the spec instead of starting a document.
    let spec: String = text.lines().map(|l| format!("  {l}\n")).collect();
    for header in HEADERS {
        round_trip::check(&format!("{header}spec:\n{spec}"));
    }
});
