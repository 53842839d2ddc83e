//! Arbitrary text must never panic the manifests source: the agent hot-reloads whatever an
//! operator saves. Whatever parses must also survive a write/parse round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod round_trip;

fuzz_target!(|text: &str| round_trip::check(text));
