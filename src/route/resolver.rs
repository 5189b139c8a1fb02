//! Which organization a network or a device belongs to: looked up upstream, cached.

use super::path::{batch_resources, canonical_resource, parse, Target, SEGMENT};
use super::{LookupError, RouteError};
use percent_encoding::utf8_percent_encode;
use std::sync::Arc;
use std::time::Duration;

/// Looks a network or a device up upstream, with the token of one of the client's grants.
#[async_trait::async_trait]
pub trait Lookup: Send + Sync {
    /// `GET {api_base}{path}` with the grant of `org`; `Ok(None)` when upstream says 404.
    async fn get_json(
        &self,
        org: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>, LookupError>;
}

/// A bounded, expiring cache of network and device → organization.
pub struct Resolver {
    networks: moka::future::Cache<String, Arc<str>>,
    devices: moka::future::Cache<String, Arc<str>>,
}

impl Resolver {
    /// A cache of at most `capacity` entries of each kind, each kept for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let build = || {
            moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build()
        };
        Resolver {
            networks: build(),
            devices: build(),
        }
    }

    /// The organization a target acts on, resolving networks and devices among `orgs` (the
    /// client's organizations).
    pub async fn organization_of(
        &self,
        target: &Target,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        match target {
            Target::Organization(id) => Ok(Arc::from(id.as_str())),
            Target::Network(id) => self.network_org(id, orgs, lookup).await,
            Target::Device(serial) => self.device_org(serial, orgs, lookup).await,
            Target::OrganizationList | Target::Unscoped => Err(RouteError::NoOrganization),
        }
    }

    /// Checks that every resource of an action batch lies in `org`, the batch's organization.
    pub async fn check_batch(
        &self,
        body: &[u8],
        org: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<(), RouteError> {
        for resource in batch_resources(body)? {
            canonical_resource(&resource)?;
            let outside = || RouteError::ActionOutsideOrganization {
                resource: resource.clone(),
                org: org.to_owned(),
            };
            let route =
                parse(&format!("/api/v1{resource}"), &http::Method::GET).map_err(|_| outside())?;
            match self.organization_of(&route.target, orgs, lookup).await {
                Ok(o) if &*o == org => {}
                Ok(_)
                | Err(RouteError::NoOrganization | RouteError::NotInClientOrganizations { .. }) => {
                    return Err(outside())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The organization of a network, among `orgs` (the client's). Only found results are
    /// cached: a miss for one client says nothing about another client's grants.
    pub async fn network_org(
        &self,
        id: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        if let Some(org) = self.networks.get(id).await {
            return Ok(org);
        }
        let path = format!("/networks/{}", utf8_percent_encode(id, SEGMENT));
        // Boxed: a lookup is rare (the cache answers), and its state inline would enlarge the
        // future of every request's `request_filter`, which is boxed and copied (issue 26).
        let org = Box::pin(self.find(&path, orgs, lookup, "network", id, |v| {
            v.get("organizationId")
                .and_then(|o| o.as_str())
                .map(str::to_owned)
        }))
        .await?;
        let org: Arc<str> = Arc::from(org);
        self.networks.insert(id.to_owned(), org.clone()).await;
        Ok(org)
    }

    /// The organization of a device, through its network.
    pub async fn device_org(
        &self,
        serial: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
    ) -> Result<Arc<str>, RouteError> {
        if let Some(org) = self.devices.get(serial).await {
            return Ok(org);
        }
        let path = format!("/devices/{}", utf8_percent_encode(serial, SEGMENT));
        // Boxed, as in `network_org`.
        let network = Box::pin(self.find(&path, orgs, lookup, "device", serial, |v| {
            v.get("networkId")
                .and_then(|o| o.as_str())
                .map(str::to_owned)
        }))
        .await?;
        let org = self
            .network_org(&network, orgs, lookup)
            .await
            .map_err(|e| match e {
                RouteError::NotInClientOrganizations { .. } => {
                    RouteError::NotInClientOrganizations {
                        kind: "device",
                        id: serial.to_owned(),
                    }
                }
                other => other,
            })?;
        self.devices.insert(serial.to_owned(), org.clone()).await;
        Ok(org)
    }

    async fn find(
        &self,
        path: &str,
        orgs: &[String],
        lookup: &dyn Lookup,
        kind: &'static str,
        id: &str,
        field: impl Fn(&serde_json::Value) -> Option<String>,
    ) -> Result<String, RouteError> {
        let mut failure = None;
        for org in orgs {
            match lookup.get_json(org, path).await {
                Ok(Some(v)) => {
                    return field(&v).ok_or_else(|| RouteError::LookupFailed {
                        kind,
                        id: id.to_owned(),
                        cause: LookupError::upstream(502, "Meraki's answer names no owner"),
                    })
                }
                Ok(None) => {}
                Err(cause) => failure = Some(cause),
            }
        }
        Err(match failure {
            Some(cause) => RouteError::LookupFailed {
                kind,
                id: id.to_owned(),
                cause,
            },
            None => RouteError::NotInClientOrganizations {
                kind,
                id: id.to_owned(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct FakeUpstream {
        objects: HashMap<(&'static str, &'static str), serde_json::Value>,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Lookup for FakeUpstream {
        async fn get_json(
            &self,
            org: &str,
            path: &str,
        ) -> Result<Option<serde_json::Value>, LookupError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(self
                .objects
                .iter()
                .find(|((o, p), _)| *o == org && *p == path)
                .map(|(_, v)| v.clone()))
        }
    }

    #[tokio::test]
    async fn action_batch_resources_must_stay_in_the_batch_organization() {
        let up = FakeUpstream {
            objects: HashMap::from([
                (
                    ("1", "/networks/N1"),
                    serde_json::json!({"id": "N1", "organizationId": "1"}),
                ),
                (
                    ("2", "/networks/N2"),
                    serde_json::json!({"id": "N2", "organizationId": "2"}),
                ),
            ]),
            calls: AtomicUsize::new(0),
        };
        let r = Resolver::new(100, Duration::from_secs(60));
        let orgs = vec!["1".to_string(), "2".to_string()];
        let batch = |res: &str| {
            serde_json::json!({"actions": [{"resource": "/networks/N1/appliance/vlans", "operation": "create"}, {"resource": res, "operation": "update"}]}).to_string()
        };
        assert!(r
            .check_batch(batch("/networks/N1").as_bytes(), "1", &orgs, &up)
            .await
            .is_ok());
        assert!(r
            .check_batch(batch("/organizations/1/admins").as_bytes(), "1", &orgs, &up)
            .await
            .is_ok());
        for bad in [
            "/networks/N2",
            "/organizations/2/admins",
            "/administered/identities/me",
            "/networks/N9",
        ] {
            let e = r
                .check_batch(batch(bad).as_bytes(), "1", &orgs, &up)
                .await
                .unwrap_err();
            assert!(
                matches!(e, RouteError::ActionOutsideOrganization { .. }),
                "{bad}: {e:?}"
            );
        }
        assert!(matches!(
            r.check_batch(b"not json", "1", &orgs, &up).await,
            Err(RouteError::BadActionBatch(_))
        ));
        // What a URL parser upstream would read differently from the proxy's check is refused
        // before any lookup, naming the resource.
        for spelling in [
            "/networks/N2?/../../networks/N1",
            "/networks/N2#/../../networks/N1",
            "/organizations/2?/../../organizations/1/networks",
            "/networks/N1/../../organizations/2",
            "/networks/N1/%2e%2e/%2e%2e/organizations/2",
            "/networks/N1/..;/..;/organizations/2",
            "//networks/N1",
            "networks/N1",
            "/networks/N1\\..\\..\\organizations\\2",
            "/networks/N1 ",
            "/networks/N 1",
            "/networks/N1\t",
        ] {
            let e = r
                .check_batch(batch(spelling).as_bytes(), "1", &orgs, &up)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, RouteError::NonCanonicalResource { resource, .. } if resource == spelling),
                "{spelling}: {e:?}"
            );
        }
        let route = parse("/api/v1/organizations/1/actionBatches", &Method::POST).unwrap();
        assert!(route.is_action_batch(&Method::POST));
        assert!(
            !parse("/api/v1/organizations/1/actionBatches/7", &Method::POST)
                .unwrap()
                .is_action_batch(&Method::POST)
        );
    }

    #[tokio::test]
    async fn resolver_caches_found_objects_only() {
        let up = FakeUpstream {
            objects: HashMap::from([
                (
                    ("1", "/networks/N1"),
                    serde_json::json!({"id": "N1", "organizationId": "1"}),
                ),
                (
                    ("1", "/devices/Q-1"),
                    serde_json::json!({"serial": "Q-1", "networkId": "N1"}),
                ),
            ]),
            calls: AtomicUsize::new(0),
        };
        let r = Resolver::new(100, Duration::from_secs(60));
        let orgs = vec!["1".to_string()];
        assert_eq!(&*r.network_org("N1", &orgs, &up).await.unwrap(), "1");
        assert_eq!(&*r.network_org("N1", &orgs, &up).await.unwrap(), "1");
        assert_eq!(up.calls.load(Ordering::SeqCst), 1);
        assert_eq!(&*r.device_org("Q-1", &orgs, &up).await.unwrap(), "1");
        assert!(matches!(
            r.network_org("N2", &orgs, &up).await.unwrap_err(),
            RouteError::NotInClientOrganizations {
                kind: "network",
                ..
            }
        ));
        let before = up.calls.load(Ordering::SeqCst);
        let _ = r.network_org("N2", &orgs, &up).await;
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            before + 1,
            "misses are not cached"
        );
    }
}
