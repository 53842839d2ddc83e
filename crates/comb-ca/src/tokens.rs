//! Bearer tokens: a file mapping each token to the node it authenticates (the lab's stand-in
//! for Kubernetes TokenReview). One `TOKEN NODE` pair per line; blank lines and `#` comments
//! are ignored.

use std::path::Path;

use anyhow::{Context, Result, bail};

#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<&str> = self.entries.iter().map(|(_, n)| n.as_str()).collect();
        f.debug_struct("Tokens").field("nodes", &nodes).finish()
    }
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?;
        Self::parse(&text).with_context(|| path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(token), Some(node), None) = (it.next(), it.next(), it.next()) else {
                bail!("line {}: expected `TOKEN NODE`", i + 1);
            };
            if token.len() < 16 {
                bail!("line {}: token too short (at least 16 characters)", i + 1);
            }
            entries.push((token.as_bytes().to_vec(), node.to_string()));
        }
        if entries.is_empty() {
            bail!("no tokens");
        }
        Ok(Self { entries })
    }

    /// The node `token` authenticates. Compares every entry in constant time per entry.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (t, node) in &self.entries {
            if ct_eq(t, token.as_bytes()) {
                found = Some(node.as_str());
            }
        }
        found
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new random token (hex, 32 characters).
pub fn new_token() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_look_up() {
        let t =
            Tokens::parse("# lab\n0123456789abcdef0123 n1\n\nfedcba9876543210fedc n2\n").unwrap();
        assert_eq!(t.node_of("0123456789abcdef0123"), Some("n1"));
        assert_eq!(t.node_of("fedcba9876543210fedc"), Some("n2"));
        assert_eq!(t.node_of("0123456789abcdef012"), None);
        assert_eq!(t.node_of(""), None);
        assert!(!format!("{t:?}").contains("0123"));
        let e = Tokens::parse("abc\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(Tokens::parse("short n1").is_err());
        assert!(Tokens::parse("# nothing").is_err());
        assert_eq!(new_token().len(), 32);
    }
}
