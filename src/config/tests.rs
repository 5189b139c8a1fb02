//! The configuration's unit tests: parsing, validation and the summary.

use super::validate::integrations::scope_is_known;
use super::*;
use std::path::PathBuf;
use std::time::Duration;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
[upstream]
api_base = "https://api.meraki.com/api/v1"
token_url = "https://as.meraki.com/oauth/token"
[store]
key_env = "STORE_KEY"
[[integrations]]
name = "netops"
client_id = "cid"
client_secret_env = "SECRET_VAR"
scopes = ["dashboard:general:config:read", "wireless:telemetry:read"]
[[clients]]
name = "backup"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
integration = "netops"
organizations = ["123"]
methods = ["get"]
"#;

#[test]
fn the_example_proxy_toml_is_valid() {
    let text = include_str!("../../proxy.toml");
    // Every variable the file names is set; the proxy variables of the environment are not.
    let c = Config::parse(text, Path::new("/etc/proxy.toml"), &|v| {
        (!v.to_ascii_lowercase().ends_with("_proxy")).then(|| "11".repeat(32))
    })
    .unwrap();
    assert!(!c.clients.is_empty() && !c.integrations.is_empty());
}

#[test]
fn a_client_may_hold_several_keys_each_with_an_expiry() {
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let c = parse(&GOOD.replace(
        "key_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
        &format!("key_sha256 = [\"{a}\", \"{b}\"]\nkey_expires = {{ \"{b}\" = \"2026-12-31T00:00:00Z\" }}"),
    ))
    .unwrap();
    let keys = &c.clients[0].keys;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].expires_at, None);
    assert_eq!(keys[1].expires_at, Some(1_798_675_200));
    assert!(c.to_string().contains("keys=2 (a key expire"), "{c}");
    for (replacement, key, problem) in [
        (
            format!("key_sha256 = [\"{a}\", \"x\"]"),
            "clients[0].key_sha256[1]",
            "64 hex",
        ),
        (
            "key_sha256 = []".to_string(),
            "clients[0].key_sha256",
            "at least one",
        ),
        (
            format!(
                "key_sha256 = [\"{a}\"]\nkey_expires = {{ \"{b}\" = \"2026-12-31T00:00:00Z\" }}"
            ),
            "key_expires",
            "names no digest",
        ),
        (
            format!("key_sha256 = [\"{a}\"]\nkey_expires = {{ \"{a}\" = \"next tuesday\" }}"),
            "key_expires",
            "RFC 3339",
        ),
    ] {
        let e = parse(&GOOD.replace(
            "key_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
            &replacement,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(key) && e.contains(problem), "{replacement}: {e}");
    }
}

#[test]
fn client_operations_are_checked_against_the_api_table() {
    let with = |ops: &str| parse(&format!("{GOOD}operations = {ops}\n"));
    let c = with(r#"["getOrganizationNetworks", "wireless:read", "*:read"]"#).unwrap();
    let table = crate::endpoints::EndpointTable::builtin();
    let client = &c.clients[0];
    let op = |id: &str| table.by_operation_id(id).unwrap();
    assert!(client.may_run(op("getOrganizationNetworks")));
    assert!(client.may_run(op("getNetworkWirelessSsids")));
    assert!(!client.may_run(op("updateNetworkWirelessSsid")));
    let c = with(r#"["wireless:write"]"#).unwrap();
    assert!(c.clients[0].may_run(op("updateNetworkWirelessSsid")));
    assert!(!c.clients[0].may_run(op("getNetworkWirelessSsids")));
    assert!(c.to_string().contains("operations=[wireless:write]"), "{c}");
    for (ops, key, problem) in [
        (
            r#"["getOrganizationNetwork"]"#,
            "clients[0].operations[0]",
            "no operation",
        ),
        (
            r#"["getOrganizations", "wifi:read"]"#,
            "clients[0].operations[1]",
            "no product family",
        ),
        (
            r#"["wireless:delete"]"#,
            "clients[0].operations[0]",
            "expected read, write or *",
        ),
        ("[]", "clients[0].operations", "at least one"),
    ] {
        let e = with(ops).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(problem), "{ops}: {e}");
    }
    let e = parse(&GOOD.replace(
        "admin_listen",
        "unknown_endpoints = \"maybe\"\nadmin_listen",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.unknown_endpoints"), "{e}");
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/proxy.toml"), &|v| match v {
        "SECRET_VAR" => Some("s3cret-value".to_string()),
        "STORE_KEY" => Some("11".repeat(32)),
        "SHORT_KEY" => Some("abc".to_string()),
        _ => None,
    })
}

#[test]
fn good_config_parses_and_summary_hides_the_secret() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        c.clients[0].methods.as_ref().unwrap(),
        &[http::Method::GET, http::Method::HEAD]
    );
    assert_eq!(c.store_path, PathBuf::from("/etc/tokens.db"));
    let summary = format!("{c}\n{c:?}");
    assert!(!summary.contains("s3cret-value"), "{summary}");
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn the_removed_age_rule_names_what_replaced_it() {
    let e = err(&format!("{GOOD}\n[tokens]\nrejected_grace_secs = 30\n"));
    assert!(
        e.contains("tokens.rejected_grace_secs")
            && e.contains("tokens.refused_operation_memory_secs"),
        "{e}"
    );
    let e = err(&format!(
        "{GOOD}\n[tokens]\nrefused_operation_memory_secs = 90000\n"
    ));
    assert!(e.contains("tokens.refused_operation_memory_secs"), "{e}");
    let c = parse(&format!(
        "{GOOD}\n[tokens]\nrefused_operation_memory_secs = 0\n"
    ))
    .unwrap();
    assert!(c.refused_operation_memory.is_zero());
    assert_eq!(
        parse(GOOD).unwrap().refused_operation_memory,
        Duration::from_secs(600)
    );
}

#[test]
fn unknown_key_is_named() {
    let e = err(&GOOD.replace("[server]\n", "[server]\nlisten_port = 1\n"));
    assert!(
        e.contains("/etc/proxy.toml") && e.contains("listen_port"),
        "{e}"
    );
}

#[test]
fn bad_values_name_the_key_and_the_expectation() {
    let cases = [
        (GOOD.replace("127.0.0.1:8080", "localhost"), "server.listen"),
        (
            GOOD.replace(
                "000000000000000000000000000000000000000000000000000000000000000\"",
                "zz\"",
            ),
            "clients[0].key_sha256",
        ),
        (
            GOOD.replace("integration = \"netops\"", "integration = \"other\""),
            "clients[0].integration",
        ),
        (
            GOOD.replace("\"123\"", "\"abc\""),
            "clients[0].organizations[0]",
        ),
        (
            GOOD.replace("[\"get\"]", "[\"FETCH\"]"),
            "clients[0].methods[0]",
        ),
        (
            GOOD.replace("SECRET_VAR", "MISSING_VAR"),
            "integrations[0].client_secret_env",
        ),
        (
            GOOD.replace("wireless:telemetry:read", "wireless:all"),
            "integrations[0].scopes[1]",
        ),
        (
            GOOD.replace("https://api.meraki.com/api/v1", "api.meraki.com"),
            "upstream.api_base",
        ),
    ];
    for (text, key) in cases {
        let e = err(&text);
        assert!(e.contains(key), "expected {key} in: {e}");
        assert!(e.starts_with("/etc/proxy.toml: "), "{e}");
    }
}

/// A CA and a server certificate for `api.meraki.com` signed by it, written to `dir`.
fn write_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["api.meraki.com".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (c, k, a) = (
        dir.join("proxy.pem"),
        dir.join("proxy.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&a, ca.pem()).unwrap();
    (c, k, a, key.serialize_pem())
}

#[test]
fn tls_settings_load_their_files_and_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca, key_pem) = write_pki(dir.path());
    let server = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\npublic_base_url = [\"https://api.meraki.com/api/v1\", \"https://api.meraki.ca:8443/api/v1/\"]\nadmin_listen",
        cert.display(),
        key.display(),
        ca.display()
    );
    let upstream = format!(
        "[upstream]\nca_file = \"{}\"\nresolve = {{ \"API.meraki.com\" = \"192.0.2.10\" }}\n",
        ca.display()
    );
    let bound = "\n[[clients]]\nname = \"appliance\"\ncert_subject = \"CN=backup-script,O=netops\"\nintegration = \"netops\"\norganizations = [\"123\"]\n";
    let text = format!("{GOOD}{bound}")
        .replace("admin_listen", &server)
        .replace("[upstream]\n", &upstream);
    let c = parse(&text).unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert.names, ["api.meraki.com"]);
    assert!(tls.client_cert_required);
    assert_eq!(
        c.public_origins
            .iter()
            .map(|o| (o.origin.as_str(), o.authority.as_str()))
            .collect::<Vec<_>>(),
        [
            ("https://api.meraki.com", "api.meraki.com"),
            ("https://api.meraki.ca:8443", "api.meraki.ca:8443")
        ]
    );
    assert_eq!(c.upstream.ca.as_ref().unwrap().certs.len(), 1);
    assert_eq!(
        c.upstream.resolve.get("api.meraki.com"),
        Some(&"192.0.2.10".parse().unwrap())
    );
    assert!(c.clients[1].cert.is_some() && c.clients[1].keys.is_empty());
    let shown = format!("{c}\n{c:?}");
    assert!(shown.contains("proxy listener: https://"), "{shown}");
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(
        !shown.contains(key_body) && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );

    let missing = dir.path().join("missing.key");
    for (from, to, key, problem) in [
        (
            key.display().to_string(),
            missing.display().to_string(),
            "server.tls_key_file",
            "cannot read",
        ),
        (
            key.display().to_string(),
            cert.display().to_string(),
            "server.tls_key_file",
            "no PEM private key",
        ),
        (
            cert.display().to_string(),
            key.display().to_string(),
            "server.tls_cert_file",
            "no PEM certificate",
        ),
        (
            "tls_client_ca_file".into(),
            "tls_client_auth = \"maybe\"\ntls_client_ca_file".into(),
            "server.tls_client_auth",
            "\"required\" or \"optional\"",
        ),
        (
            "https://api.meraki.ca:8443/api/v1/".into(),
            "https://api.meraki.ca/v2".into(),
            "server.public_base_url[1]",
            "ending in /api/v1",
        ),
        (
            "CN=backup-script,O=netops".into(),
            "CN=backup-script,XX=netops".into(),
            "clients[1].cert_subject",
            "unknown attribute",
        ),
        (
            "192.0.2.10".into(),
            "not-an-ip".into(),
            "upstream.resolve.API.meraki.com",
            "IP address",
        ),
    ] {
        let e = parse(&text.replace(&from, &to)).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(problem), "{key}: {e}");
        assert!(!e.contains(key_body), "{e}");
    }
    // A certificate binding without mutual TLS can never match: refused.
    let e = parse(&text.replace(&format!("tls_client_ca_file = \"{}\"\n", ca.display()), ""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clients[1].cert_subject") && e.contains("mutual TLS"),
        "{e}"
    );
}

#[test]
fn the_egress_proxy_comes_from_the_file_or_https_proxy() {
    let with_env = |text: &str, https_proxy: Option<&str>| {
        Config::parse(text, Path::new("/etc/proxy.toml"), &|v| match v {
            "SECRET_VAR" => Some("s".into()),
            "STORE_KEY" => Some("11".repeat(32)),
            "HTTPS_PROXY" => https_proxy.map(str::to_owned),
            "NO_PROXY" => Some("internal.example".into()),
            _ => None,
        })
    };
    let c = with_env(GOOD, None).unwrap();
    assert!(c.upstream.egress.is_none());
    let c = with_env(GOOD, Some("http://user:pa55word@proxy.corp:3128")).unwrap();
    let e = c.upstream.egress.as_ref().unwrap();
    assert_eq!(e.authority(), "proxy.corp:3128");
    assert!(e.bypasses("a.internal.example"));
    let shown = format!("{c}\n{c:?}");
    assert!(
        !shown.contains("pa55word") && !shown.contains("user:"),
        "{shown}"
    );
    let file = GOOD.replace("[upstream]\n", "[upstream]\negress_proxy = \"none\"\n");
    assert!(with_env(&file, Some("http://proxy.corp:3128"))
        .unwrap()
        .upstream
        .egress
        .is_none());
    let file = GOOD.replace(
        "[upstream]\n",
        "[upstream]\negress_proxy = \"http://u:p@proxy:1\"\n",
    );
    let e = with_env(&file, None).unwrap_err().to_string();
    assert!(
        e.contains("upstream.egress_proxy") && e.contains("credentials"),
        "{e}"
    );
    assert!(!e.contains("u:p@"), "{e}");
}

#[test]
fn rate_limits_default_to_merakis_figures_and_bad_values_name_the_key() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.rate_limits, RateLimits::default());
    assert_eq!(c.clients[0].weight, 1);
    assert!(
        c.to_string()
            .contains("rate limits: 10 requests/s per organization (burst 10)"),
        "{c}"
    );
    let with = |section: &str| format!("{GOOD}weight = 3\n[rate_limits]\n{section}\n");
    let c = parse(&with(
        "enabled = false\norganization_rps = 4.5\norganization_burst = 2\nsource_rps = 50\nmax_wait_ms = 500\nqueue_per_client = 8\nsource_shared = false",
    ))
    .unwrap();
    let r = c.rate_limits;
    assert!(!r.source_shared);
    assert!(RateLimits::default().source_shared);
    assert_eq!(
        (
            r.enabled,
            r.organization_rps,
            r.organization_burst,
            r.source_rps
        ),
        (false, 4.5, 2.0, 50.0)
    );
    assert_eq!(
        (r.max_wait, r.queue_per_client),
        (Duration::from_millis(500), 8)
    );
    assert_eq!(c.clients[0].weight, 3);
    assert!(c.to_string().contains("rate limits: off"), "{c}");
    for (section, key, problem) in [
        (
            "organization_rps = 0",
            "rate_limits.organization_rps",
            "above 0",
        ),
        (
            "organization_rps = -3",
            "rate_limits.organization_rps",
            "above 0",
        ),
        ("source_rps = 0.0", "rate_limits.source_rps", "above 0"),
        (
            "organization_burst = 0.5",
            "rate_limits.organization_burst",
            "1 to 1000000",
        ),
        ("max_wait_ms = 0", "rate_limits.max_wait_ms", "1 to 60000"),
        (
            "queue_per_client = 0",
            "rate_limits.queue_per_client",
            "1 to 100000",
        ),
        ("queue = 3", "queue", "unknown field"),
        ("enabled = \"yes\"", "enabled", "bool"),
        ("source_shared = 1", "source_shared", "bool"),
    ] {
        let e = parse(&with(section)).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(problem), "{section}: {e}");
    }
    let e = parse(&format!("{GOOD}weight = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clients[0].weight") && e.contains("1 to 1000"),
        "{e}"
    );
    let e = parse(&format!("{GOOD}weight = 1.5\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight"), "{e}");
}

#[test]
fn scopes_follow_meraki() {
    assert!(scope_is_known("dashboard:iam:config:write"));
    assert!(scope_is_known("sm:telemetry:read"));
    assert!(!scope_is_known("dashboard:wireless:config:read"));
    assert!(!scope_is_known("switch:config:admin"));
}

#[test]
fn a_syntax_error_names_the_line_without_quoting_it() {
    let text = "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\napi_base = \"https://api.meraki.com/api/v1\"\ntoken_url = \"https://as.meraki.com/oauth/token\"\n[[integrations]]\nname = \"n\"\nclient_id = \"i\"\nclient_secret = \"pasted-secret-value-1234\"\n";
    let e = parse(text).unwrap_err().to_string();
    assert!(e.contains("line 9") && e.contains("client_secret"), "{e}");
    assert!(!e.contains("pasted-secret-value"), "{e}");
}

#[test]
fn client_limits_have_defaults_and_bad_values_name_their_key() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.client_limits, crate::config::ClientLimits::default());
    assert!(c.client_limits.header_timeout <= Duration::from_secs(30));
    let with = |lines: &str| GOOD.replace("[server]\n", &format!("[server]\n{lines}\n"));
    let c = parse(&with(
        "header_timeout_secs = 5\nbody_timeout_secs = 7\nidle_timeout_secs = 9\nrequest_timeout_secs = 60\nmax_connections = 100\nmax_connections_per_peer = 10",
    ))
    .unwrap();
    let l = c.client_limits;
    assert_eq!(
        (
            l.header_timeout,
            l.body_timeout,
            l.idle_timeout,
            l.request_timeout
        ),
        (
            Duration::from_secs(5),
            Duration::from_secs(7),
            Duration::from_secs(9),
            Duration::from_secs(60)
        )
    );
    assert_eq!((l.max_connections, l.max_connections_per_peer), (100, 10));
    // A small listener limit lowers the per-peer default with it.
    let c = parse(&with("max_connections = 50")).unwrap();
    assert_eq!(c.client_limits.max_connections_per_peer, 50);
    for (lines, key) in [
        ("header_timeout_secs = 0", "server.header_timeout_secs"),
        ("header_timeout_secs = 301", "server.header_timeout_secs"),
        ("body_timeout_secs = 0", "server.body_timeout_secs"),
        ("idle_timeout_secs = 0", "server.idle_timeout_secs"),
        ("request_timeout_secs = 0", "server.request_timeout_secs"),
        ("max_connections = 0", "server.max_connections"),
        (
            "max_connections_per_peer = 0",
            "server.max_connections_per_peer",
        ),
        (
            "max_connections = 10\nmax_connections_per_peer = 11",
            "server.max_connections_per_peer",
        ),
    ] {
        let e = err(&with(lines));
        assert!(e.contains(key) && e.contains("expected"), "{lines}: {e}");
    }
    let summary = parse(GOOD).unwrap().to_string();
    assert!(
        summary.contains("client timeouts: header 20 s")
            && summary.contains("256 per peer address"),
        "{summary}"
    );
}

#[test]
fn source_addresses_and_trusted_proxies_are_cidrs_named_by_key() {
    let c = parse(&GOOD.replace(
        "methods = [\"get\"]",
        "methods = [\"get\"]\nsource_addresses = [\"10.1.2.0/24\", \"2001:db8::/48\", \"192.0.2.9\"]",
    ))
    .unwrap();
    let a = c.clients[0].source_addresses.as_ref().unwrap();
    assert!(a.contains("10.1.2.77".parse().unwrap()));
    assert!(a.contains("2001:db8:0:1::5".parse().unwrap()));
    assert!(a.contains("192.0.2.9".parse().unwrap()));
    assert!(!a.contains("10.1.3.1".parse().unwrap()));
    assert!(
        c.to_string()
            .contains("from=[10.1.2.0/24, 2001:db8::/48, 192.0.2.9/32]"),
        "{c}"
    );
    assert!(c.trusted_proxies.is_empty() && !c.proxy_protocol);
    let anywhere = parse(GOOD).unwrap();
    assert!(anywhere.clients[0].source_addresses.is_none());
    assert!(anywhere.to_string().contains("from=anywhere"));

    let server = |lines: &str| {
        GOOD.replace(
            "admin_listen = \"127.0.0.1:9090\"",
            &format!("admin_listen = \"127.0.0.1:9090\"\n{lines}"),
        )
    };
    let c = parse(&server(
        "trusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol = true",
    ))
    .unwrap();
    assert!(c.proxy_protocol);
    assert!(c.trusted_proxies.contains("10.9.9.9".parse().unwrap()));
    assert!(c.to_string().contains("X-Forwarded-For believed from trusted proxies [10.0.0.0/8]; PROXY protocol required from them"), "{c}");

    let client = |list: &str| {
        GOOD.replace(
            "methods = [\"get\"]",
            &format!("methods = [\"get\"]\nsource_addresses = {list}"),
        )
    };
    for (text, key, problem) in [
        (
            client("[\"10.1.2.0/24\", \"10.1.2.0/33\"]"),
            "clients[0].source_addresses[1]",
            "expected an IPv4 or IPv6 network",
        ),
        (
            client("[\"10.1.2.3/24\"]"),
            "clients[0].source_addresses[0]",
            "did you mean 10.1.2.0/24?",
        ),
        (
            client("[\"office\"]"),
            "clients[0].source_addresses[0]",
            "\"office\"",
        ),
        (
            client("[]"),
            "clients[0].source_addresses",
            "at least one network",
        ),
        (
            server("trusted_proxies = [\"fe80::1/10\"]"),
            "server.trusted_proxies[0]",
            "did you mean fe80::/10?",
        ),
        (
            server("proxy_protocol = true"),
            "server.proxy_protocol",
            "needs server.trusted_proxies",
        ),
    ] {
        let e = err(&text);
        assert!(
            e.contains(key) && e.contains(problem),
            "expected {key}: {problem} in: {e}"
        );
    }
}

#[test]
fn check_lists_what_the_integrations_scopes_cannot_serve() {
    let two = GOOD.replace(
        "methods = [\"get\"]",
        "methods = [\"get\"]\n[[clients]]\nname = \"twin\"\nkey_sha256 = \"1111111111111111111111111111111111111111111111111111111111111111\"\nintegration = \"netops\"\norganizations = [\"123\"]\nmethods = [\"get\"]",
    );
    let text = parse(&two).unwrap().to_string();
    let backup = &text[text.find("  backup ").unwrap()..text.find("  twin ").unwrap()];
    assert!(
        backup.contains("operations its scopes cannot serve ("),
        "{backup}"
    );
    assert!(
        backup.contains("      dashboard:iam:config:read ("),
        "{backup}"
    );
    assert!(backup.contains("getOrganizationAdmins"), "{backup}");
    assert!(
        !backup.contains("createOrganizationAdmin"),
        "GET only: {backup}"
    );
    assert!(
        !backup.contains("wireless:telemetry:read ("),
        "the integration holds it: {backup}"
    );
    assert!(
        text.contains("  twin ") && text.contains("as for client backup"),
        "{text}"
    );
    let none = parse(&GOOD.replace(
        "scopes = [\"dashboard:general:config:read\", \"wireless:telemetry:read\"]",
        "",
    ))
    .unwrap()
    .to_string();
    assert!(none.contains("integration netops lists none"), "{none}");
}

#[test]
fn metrics_detail_defaults_to_the_busiest_and_bad_values_name_the_key() {
    use crate::config::{Detail, MetricsConfig};
    let c = parse(GOOD).unwrap();
    assert_eq!(c.metrics, MetricsConfig::default());
    assert_eq!(
        (c.metrics.per_client, c.metrics.per_organization),
        (Detail::Top, Detail::Top)
    );
    assert_eq!(
        (c.metrics.top_clients, c.metrics.top_organizations),
        (10, 25)
    );
    assert!(
        c.to_string()
            .contains("metrics: per client top (10), per organization top (25)"),
        "{c}"
    );
    let with = |section: &str| format!("{GOOD}\n[metrics]\n{section}\n");
    let c = parse(&with(
        "per_client = \"on\"\nper_organization = \"off\"\ntop_clients = 3\ntop_organizations = 7",
    ))
    .unwrap();
    assert_eq!(
        c.metrics,
        MetricsConfig {
            per_client: Detail::On,
            per_organization: Detail::Off,
            top_clients: 3,
            top_organizations: 7,
        }
    );
    assert!(
        c.to_string()
            .contains("metrics: per client on, per organization off"),
        "{c}"
    );
    for (section, key, problem) in [
        (
            "per_client = \"some\"",
            "metrics.per_client",
            "\"top\", \"on\" or \"off\"",
        ),
        (
            "per_organization = \"all\"",
            "metrics.per_organization",
            "\"top\", \"on\" or \"off\"",
        ),
        ("top_clients = 0", "metrics.top_clients", "1 to 1000"),
        (
            "top_organizations = 5000",
            "metrics.top_organizations",
            "1 to 1000",
        ),
        ("top = 3", "top", "unknown field"),
    ] {
        let e = parse(&with(section)).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(problem), "{section}: {e}");
    }
}
