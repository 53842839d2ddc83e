//! Envoy's rendering of [`ResponseFlags`]: short codes in Envoy's bit order, comma-joined,
//! `-` when none (the `response_flags` label and access log field).

use super::ResponseFlags;

/// Envoy's order (its `ResponseFlag` enum order), which is also the order it prints them in.
const CODES: [(u32, &str); 6] = [
    (ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "UT"),
    (ResponseFlags::UPSTREAM_CONNECTION_FAILURE, "UF"),
    (ResponseFlags::UPSTREAM_CONNECTION_TERMINATION, "UC"),
    (ResponseFlags::UPSTREAM_OVERFLOW, "UO"),
    (ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
    (ResponseFlags::UPSTREAM_PROTOCOL_ERROR, "UPE"),
];

impl ResponseFlags {
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, flag: u32) -> bool {
        self.0 & flag != 0
    }

    /// `-` or e.g. `UF,URX`. Unknown bits are ignored.
    pub fn render(self) -> String {
        let mut out = String::new();
        for (bit, code) in CODES {
            if self.0 & bit != 0 {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(code);
            }
        }
        if out.is_empty() {
            out.push('-');
        }
        out
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_envoy_order() {
        assert_eq!(ResponseFlags::NONE.render(), "-");
        let f = ResponseFlags(
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        );
        assert_eq!(f.render(), "UT,UF");
        assert_eq!(
            ResponseFlags(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION).to_string(),
            "DC"
        );
        assert_eq!(ResponseFlags(1 << 30).render(), "-");
    }
}
