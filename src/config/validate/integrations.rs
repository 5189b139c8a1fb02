//! `[[integrations]]`: the OAuth integrations, their secrets and scopes.

use super::{valid_name, Validator};
use crate::config::{file, ConfigError, Integration};
use crate::secret::Secret;
use std::collections::HashSet;
use std::sync::Arc;

/// Scopes Meraki defines (SPEC.md): `dashboard:{general,iam,licensing}:...` and product scopes.
pub(in crate::config) fn scope_is_known(scope: &str) -> bool {
    crate::scope::Scope::parse(scope).is_some()
}

impl Validator<'_> {
    pub(super) fn integrations(
        &self,
        raw: Vec<file::Integration>,
    ) -> Result<Vec<Arc<Integration>>, ConfigError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, it) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("integrations[{i}].{k}");
            if !valid_name(&it.name) {
                return Err(self.invalid(
                    key("name"),
                    format!("expected letters, digits, '-' or '_', got {:?}", it.name),
                ));
            }
            if !seen.insert(it.name.clone()) {
                return Err(self.invalid(
                    key("name"),
                    format!("integration {:?} is defined twice", it.name),
                ));
            }
            if it.client_id.trim().is_empty() {
                return Err(self.invalid(
                    key("client_id"),
                    "expected the integration's OAuth client ID, got an empty string",
                ));
            }
            let client_secret = match (&it.client_secret_env, &it.client_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(key("client_secret_env"), "set client_secret_env or client_secret_file, not both"))
                }
                (None, None) => {
                    return Err(self.invalid(
                        key("client_secret_env"),
                        "expected the name of an environment variable (or client_secret_file) holding the client secret; secrets never sit in proxy.toml",
                    ))
                }
                (Some(var), None) => match (self.env)(var) {
                    Some(v) if !v.trim().is_empty() => Secret::new(v.trim().to_string()),
                    _ => {
                        return Err(self.invalid(
                            key("client_secret_env"),
                            format!("environment variable {var} is not set or empty"),
                        ))
                    }
                },
                (None, Some(f)) => {
                    let p = self.path(f);
                    match std::fs::read_to_string(&p) {
                        Ok(v) if !v.trim().is_empty() => Secret::new(v.trim().to_string()),
                        Ok(_) => return Err(self.invalid(key("client_secret_file"), format!("{} is empty", p.display()))),
                        Err(e) => return Err(self.invalid(key("client_secret_file"), format!("cannot read {}: {e}", p.display()))),
                    }
                }
            };
            let redirect_uri = it
                .redirect_uri
                .as_deref()
                .map(|u| self.url(&key("redirect_uri"), u))
                .transpose()?;
            for (j, s) in it.scopes.iter().enumerate() {
                if !scope_is_known(s) {
                    return Err(self.invalid(
                        format!("integrations[{i}].scopes[{j}]"),
                        format!("expected a Meraki scope such as \"dashboard:general:config:read\" or \"wireless:telemetry:read\", got {s:?}"),
                    ));
                }
            }
            let scope_set = it
                .scopes
                .iter()
                .filter_map(|s| crate::scope::Scope::parse(s))
                .collect();
            out.push(Arc::new(Integration {
                name: it.name,
                client_id: it.client_id,
                client_secret,
                redirect_uri,
                scopes: it.scopes,
                scope_set,
            }));
        }
        Ok(out)
    }
}
