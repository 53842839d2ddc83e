//! Errors that point at the exact place in the input, so an operator can fix a manifest
//! without guessing which of many documents is wrong.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in the input, naming where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based document number within the file; 0 means the whole file.
    pub document: usize,
    /// Field path inside the document, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        file: &Path,
        document: usize,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_path_buf(),
            document,
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one pass; we collect them all so one run shows the whole list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Collects errors for one document so conversion code stays short.
pub(crate) struct Sink<'a> {
    pub file: &'a Path,
    pub document: usize,
    pub errors: &'a mut Vec<ConfigError>,
}

impl Sink<'_> {
    pub fn field(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(
            self.file,
            self.document,
            Some(field.into()),
            message,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_present_parts_only() {
        let p = Path::new("a.yaml");
        let full = ConfigError::new(p, 2, Some("spec.x".into()), "bad");
        assert_eq!(full.to_string(), "a.yaml: document 2: spec.x: bad");
        let whole = ConfigError::new(p, 0, None, "unreadable");
        assert_eq!(whole.to_string(), "a.yaml: unreadable");
        let doc = ConfigError::new(p, 3, None, "not a mapping");
        assert_eq!(doc.to_string(), "a.yaml: document 3: not a mapping");
        let errs = ConfigErrors(vec![full, whole]);
        assert_eq!(
            errs.to_string(),
            "a.yaml: document 2: spec.x: bad\na.yaml: unreadable"
        );
    }
}
