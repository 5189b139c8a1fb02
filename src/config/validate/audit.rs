//! `[audit]`: where the audit log goes.

use super::Validator;
use crate::config::file;
use std::path::PathBuf;

impl Validator<'_> {
    /// `[audit] path`: a file, or stdout (`None`, also for `"-"`).
    pub(super) fn audit(&self, audit: &file::Audit) -> Option<PathBuf> {
        match audit.path.as_deref() {
            None | Some("-") => None,
            Some(p) => Some(self.path(p)),
        }
    }
}
