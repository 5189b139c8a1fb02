//! Starts the real `meraki-oauth-proxy` binary against a [`Standin`] on loopback ports, with a
//! scenario most tests share: one integration, two organizations with one grant each, and two
//! clients (alice: org 111, every method; bob: org 222, GET only).

use super::standin::Standin;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meraki-oauth-proxy");
pub const CLIENT_ID: &str = "netops-client-id";
pub const CLIENT_SECRET: &str = "netops-client-secret-value-0123456789";
pub const ALICE_KEY: &str = "alice-proxy-key-5f1c9a7e";
pub const BOB_KEY: &str = "bob-proxy-key-8d2e4b6a";
/// The token store's encryption key (32 bytes, hex).
pub const STORE_KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// The two listening sockets a proxy process serves, bound on loopback ports the kernel
/// chose before the process starts, and handed to it as systemd socket activation does
/// (`LISTEN_FDS`): no port is picked by binding and releasing, and a restarted process serves
/// the same ports.
pub struct Sockets {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Sockets {
    /// Binds two loopback listeners.
    pub fn bind() -> Sockets {
        Sockets {
            proxy: TcpListener::bind("127.0.0.1:0").unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    /// (proxy, admin) ports.
    pub fn ports(&self) -> (u16, u16) {
        (
            self.proxy.local_addr().unwrap().port(),
            self.admin.local_addr().unwrap().port(),
        )
    }

    /// Hands the sockets to `cmd` as file descriptors 3 (proxy) and 4 (admin), with
    /// `LISTEN_FDS=2` and `LISTEN_FDNAMES=proxy:admin`.
    pub fn pass_to(&self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (proxy, admin) = (self.proxy.as_raw_fd(), self.admin.as_raw_fd());
        cmd.env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "proxy:admin")
            .env_remove("LISTEN_PID");
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2): copies
        // above 10 first, so that neither target (3, 4) overwrites the other source.
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{fcntl, FcntlArg};
                let p = fcntl(proxy, FcntlArg::F_DUPFD(10))?;
                let a = fcntl(admin, FcntlArg::F_DUPFD(10))?;
                nix::unistd::dup2(p, 3)?;
                nix::unistd::dup2(a, 4)?;
                Ok(())
            });
        }
    }
}

/// `[rate_limits]` lines no test load reaches, for a test that fires bursts far above Meraki's
/// 10 requests/s at one organization on purpose (the shaper would queue and then refuse them)
/// and asserts something else. Set by such a test itself, next to what it asserts.
pub const UNSHAPED: &str =
    "organization_rps = 100000\norganization_burst = 100000\nsource_rps = 1000000";

/// The keys the harness writes into every suite's configuration: where things are (listeners,
/// the stand-in, the store, the audit log) and who the clients are. Everything else is the
/// product's default unless a test sets it (`tests/standin_selftest.rs` checks this).
pub const ENVIRONMENT_KEYS: &[(&str, &[&str])] = &[
    ("server", &["listen", "admin_listen"]),
    (
        "upstream",
        &["api_base", "token_url", "authorize_url", "revoke_url"],
    ),
    ("store", &["path", "url_env", "key_env"]),
    ("audit", &["path"]),
    ("tokens", &[]),
    ("rate_limits", &[]),
    (
        "integrations",
        &[
            "name",
            "client_id",
            "client_secret_env",
            "redirect_uri",
            "scopes",
        ],
    ),
    (
        "clients",
        &[
            "name",
            "key_sha256",
            "integration",
            "organizations",
            "methods",
        ],
    ),
];

/// The SHA-256 digest of a key, as `meraki-oauth-proxy hash-key` prints it.
pub fn sha256_hex(s: &str) -> String {
    let out = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The SHA-256 digest of a key, computed in the test (for configurations of thousands of
/// clients; [`sha256_hex`] runs the CLI).
pub fn digest_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// `n` `[[clients]]` blocks of the harness's integration: client `i` is named
/// `{prefix}-{i:05}`, has the key `{prefix}-key-{i}` and the organizations `orgs_of(i)`.
pub fn many_clients(prefix: &str, n: usize, orgs_of: impl Fn(usize) -> Vec<String>) -> String {
    let mut out = String::new();
    for i in 0..n {
        let orgs: Vec<String> = orgs_of(i).iter().map(|o| format!("\"{o}\"")).collect();
        out.push_str(&format!(
            "[[clients]]\nname = \"{prefix}-{i:05}\"\nkey_sha256 = \"{}\"\nintegration = \"netops\"\norganizations = [{}]\n\n",
            digest_hex(&format!("{prefix}-key-{i}")),
            orgs.join(", ")
        ));
    }
    out
}

/// The stand-in, seeded, plus a configuration for the proxy in a temporary directory.
pub struct Scenario {
    pub standin: Standin,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    pub admin_port: u16,
    /// The refresh tokens the stand-in issued for orgs 111 and 222 (rotated by import).
    pub initial_refresh: Vec<String>,
    pub store_url: Option<String>,
    /// The sockets the proxy process serves (none when the test runs the server in-process
    /// on listeners of its own, `Options::ports`).
    pub sockets: Option<std::sync::Arc<Sockets>>,
}

/// Extra TOML appended to the generated configuration's sections.
#[derive(Default, Clone)]
pub struct Options {
    /// Lines for `[tokens]`.
    pub tokens: String,
    /// Lines for `[upstream]`.
    pub upstream: String,
    /// Lines for `[server]`.
    pub server: String,
    /// Lines for `[rate_limits]`. Empty: the product's defaults (Meraki's 10 requests/s per
    /// organization). A test whose load is far above Meraki's limits on purpose, and which
    /// asserts something else, sets [`UNSHAPED`] itself.
    pub rate_limits: String,
    /// Extra `[[clients]]` blocks (their digests from [`sha256_hex`]).
    pub clients: String,
    /// The proxy and admin ports, when the caller bound them already (an in-process server on
    /// listeners bound to port 0).
    pub ports: Option<(u16, u16)>,
    /// A PostgreSQL URL: the store is PostgreSQL (given through `url_env`), not the file.
    pub store_url: Option<String>,
    /// Lines for `[store]`.
    pub store: String,
    /// The stand-in serves HTTPS with these host names and certificates.
    pub https: Option<super::standin::Https>,
}

impl Scenario {
    /// Seeds the stand-in and writes the configuration; grants are imported with [`import`].
    pub async fn new(opts: Options) -> Scenario {
        let standin = match opts.https.clone() {
            None => Standin::start().await,
            Some(https) => Standin::start_https(https).await,
        };
        standin.add_client(CLIENT_ID, CLIENT_SECRET);
        standin.add_org("111", "Alice Org");
        standin.add_org("222", "Bob Org");
        for i in 0..3 {
            standin.add_network("111", &format!("L_111_{i}"), &format!("alice net {i}"));
        }
        standin.add_network("222", "L_222_0", "bob net");
        standin.add_device("L_111_0", "Q111-AAAA-0001", "alice ap");
        standin.add_device("L_222_0", "Q222-BBBB-0001", "bob ap");
        let scopes = [
            "dashboard:general:config:read",
            "dashboard:general:config:write",
        ];
        let initial_refresh = vec![
            standin.issue_grant(CLIENT_ID, &["111"], &scopes),
            standin.issue_grant(CLIENT_ID, &["222"], &scopes),
        ];
        let dir = tempfile::tempdir().unwrap();
        let sockets = opts
            .ports
            .is_none()
            .then(|| std::sync::Arc::new(Sockets::bind()));
        let (port, admin_port) = opts
            .ports
            .unwrap_or_else(|| sockets.as_ref().map_or((0, 0), |s| s.ports()));
        let config = dir.path().join("proxy.toml");
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
{server_extra}

[upstream]
api_base = "{api}"
token_url = "{token}"
authorize_url = "{authorize}"
revoke_url = "{revoke}"
{up_extra}

[store]
{store_line}
key_env = "MERAKI_PROXY_STORE_KEY"
{store_extra}

[audit]
path = "audit.jsonl"

[tokens]
{tok_extra}

[rate_limits]
{rate_extra}

[[integrations]]
name = "netops"
client_id = "{CLIENT_ID}"
client_secret_env = "NETOPS_CLIENT_SECRET"
redirect_uri = "http://127.0.0.1:{admin_port}/oauth/callback"
scopes = ["dashboard:general:config:read", "dashboard:general:config:write"]

[[clients]]
name = "alice"
key_sha256 = "{alice}"
integration = "netops"
organizations = ["111"]

[[clients]]
name = "bob"
key_sha256 = "{bob}"
integration = "netops"
organizations = ["222"]
methods = ["GET"]

{more_clients}
"#,
            api = standin.api_base(),
            token = standin.token_url(),
            authorize = standin.authorize_url(),
            revoke = standin.revoke_url(),
            up_extra = opts.upstream,
            store_line = if opts.store_url.is_some() {
                "url_env = \"MERAKI_PROXY_STORE_URL\""
            } else {
                "path = \"tokens.db\""
            },
            store_extra = opts.store,
            server_extra = opts.server,
            tok_extra = opts.tokens,
            rate_extra = opts.rate_limits,
            more_clients = opts.clients,
            alice = sha256_hex(ALICE_KEY),
            bob = sha256_hex(BOB_KEY),
        );
        std::fs::write(&config, text).unwrap();
        Scenario {
            standin,
            dir,
            config,
            port,
            admin_port,
            initial_refresh,
            store_url: opts.store_url,
            sockets,
        }
    }

    /// Runs the binary with this configuration and the client secret in its environment.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with(&self.config, args)
    }

    /// `run` of the binary, serving this scenario's sockets.
    pub fn serving_command(&self) -> Command {
        let mut c = self.command(&["run"]);
        self.sockets
            .as_ref()
            .expect("this scenario's server runs in-process")
            .pass_to(&mut c);
        c
    }

    /// Runs the binary with another configuration file.
    pub fn command_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        if let Some(url) = &self.store_url {
            c.env("MERAKI_PROXY_STORE_URL", url);
        }
        c.arg("--config")
            .arg(config)
            .args(args)
            .env("NETOPS_CLIENT_SECRET", CLIENT_SECRET)
            .env("MERAKI_PROXY_STORE_KEY", STORE_KEY)
            .env("RUST_LOG", "info")
            // The proxy takes its egress proxy from these: the tests' traffic stays on loopback
            // unless a test sets them.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        c
    }

    /// `grants import` for both organizations, through the real CLI.
    pub async fn import(&self) {
        self.import_grant(&self.initial_refresh[0], &["111"]).await;
        self.import_grant(&self.initial_refresh[1], &["222"]).await;
    }

    /// `grants import` of one refresh token for `orgs`, through the real CLI (the token in a
    /// file of the scenario's directory, removed afterwards); fails the test if it fails.
    pub async fn import_grant(&self, refresh_token: &str, orgs: &[&str]) {
        let file = self
            .dir
            .path()
            .join(format!("rt-{}", orgs.first().unwrap_or(&"none")));
        std::fs::write(&file, refresh_token).unwrap();
        let mut args = vec![
            "grants",
            "import",
            "--integration",
            "netops",
            "--refresh-token-file",
            file.to_str().unwrap(),
        ];
        for org in orgs {
            args.extend(["--org", org]);
        }
        let out = self.run(&args).await;
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(file).unwrap();
    }

    /// An MSP's grant: seeds `n` organizations in the stand-in (ids `first`, `first + 1`, …,
    /// named "Customer <id>"), issues one grant of the integration over all of them, and
    /// imports it through the real CLI (`--org` for each); their ids.
    pub async fn import_many(&self, first: u64, n: usize) -> Vec<String> {
        let ids: Vec<String> = (first..first + n as u64).map(|i| i.to_string()).collect();
        for id in &ids {
            self.standin.add_org(id, &format!("Customer {id}"));
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let token = self.standin.issue_grant(
            CLIENT_ID,
            &refs,
            &[
                "dashboard:general:config:read",
                "dashboard:general:config:write",
            ],
        );
        self.import_grant(&token, &refs).await;
        ids
    }

    /// Runs a CLI command to completion (off the async runtime, which serves the stand-in).
    pub async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// Starts instance `i` of a fleet sharing this scenario's store: a configuration of its
    /// own (`proxy-i.toml`: its own ports and audit log `audit-i.jsonl`), `env` added.
    pub async fn start_instance(&self, i: usize, env: &[(&str, &str)]) -> ProxyProcess {
        let sockets = Sockets::bind();
        let (port, admin_port) = sockets.ports();
        let text = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("admin_listen = \"127.0.0.1:{}\"", self.admin_port),
                &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
            )
            .replace(
                "path = \"audit.jsonl\"",
                &format!("path = \"audit-{i}.jsonl\""),
            );
        let config = self.dir.path().join(format!("proxy-{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let log = self
            .dir
            .path()
            .join(format!("proxy-{i}-{}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).unwrap();
        let stdout = stderr.try_clone().unwrap();
        let mut cmd = self.command_with(&config, &["run"]);
        sockets.pass_to(&mut cmd);
        cmd.envs(env.iter().copied()).stdout(stdout).stderr(stderr);
        let p = ProxyProcess {
            child: cmd.spawn().unwrap(),
            port,
            admin_port,
            log,
            tls: false,
            _sockets: Some(std::sync::Arc::new(sockets)),
        };
        p.wait_ready().await;
        p
    }

    /// The audit records of fleet instance `i`.
    pub fn audit_of(&self, i: usize) -> Vec<serde_json::Value> {
        read_jsonl(&self.dir.path().join(format!("audit-{i}.jsonl")))
    }

    /// Starts the proxy on this scenario's sockets and waits until both listeners answer.
    pub async fn start(&self) -> ProxyProcess {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.path().join(format!("proxy-{n}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let stdout = stderr.try_clone().unwrap();
        let child = self
            .serving_command()
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let text = std::fs::read_to_string(&self.config).unwrap_or_default();
        let p = ProxyProcess {
            child,
            port: self.port,
            admin_port: self.admin_port,
            log,
            tls: text.contains("\ntls_cert_file"),
            _sockets: self.sockets.clone(),
        };
        p.wait_ready().await;
        p
    }

    /// Points the proxy's API traffic at `api_base` (a fault injector in front of the
    /// stand-in); token calls still go to the stand-in.
    pub fn set_api_base(&self, api_base: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let old = format!("api_base = \"{}\"", self.standin.api_base());
        assert!(text.contains(&old));
        std::fs::write(
            &self.config,
            text.replace(&old, &format!("api_base = \"{api_base}\"")),
        )
        .unwrap();
    }

    /// The proxy's base URL as scripts use it.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1", self.port)
    }

    /// A request as a legacy script sends it: `path` below the proxy's base URL, `key` in
    /// Meraki's API key header.
    pub fn script(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
    ) -> reqwest::RequestBuilder {
        http()
            .request(method, format!("{}{path}", self.base()))
            .header("X-Cisco-Meraki-API-Key", key)
    }

    /// The status of one GET of `path` as `key`.
    pub async fn status(&self, path: &str, key: &str) -> u16 {
        self.script(reqwest::Method::GET, path, key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Sends `n` GETs at once as `key`, the i-th to `path_of(i)`; their statuses, in order.
    pub async fn burst(
        &self,
        n: usize,
        key: &str,
        path_of: impl Fn(usize) -> String,
    ) -> Vec<reqwest::StatusCode> {
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(self.script(reqwest::Method::GET, &path_of(i), key).send()))
            .collect();
        let mut statuses = Vec::with_capacity(n);
        for t in tasks {
            statuses.push(t.await.expect("request task").expect("response").status());
        }
        statuses
    }

    /// The audit log's records.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.dir.path().join("audit.jsonl"))
    }

    /// Every log the proxy processes wrote, concatenated.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "log") {
                all.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
        all
    }
}

/// The tests' HTTP client: bounded in time, and never following a redirect (an upstream 3xx
/// reaching a client is a failure the tests look for).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Parses a JSON-lines file (missing file: no records). A last line without its newline is a
/// record being written while the test reads: not yet a record.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A running proxy process; killed on drop.
pub struct ProxyProcess {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub log: PathBuf,
    /// The proxy listener speaks TLS.
    pub tls: bool,
    /// The sockets it serves, kept open while it runs.
    pub _sockets: Option<std::sync::Arc<Sockets>>,
}

impl ProxyProcess {
    /// The base URL scripts use with this process.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1", self.port)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            let admin = http
                .get(format!("http://127.0.0.1:{}/healthz", self.admin_port))
                .send()
                .await;
            // A TLS listener accepting connections is enough: the admin listener answering
            // means the server's services run.
            let proxy = if self.tls {
                tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            } else {
                http.get(format!(
                    "http://127.0.0.1:{}/api/v1/organizations",
                    self.port
                ))
                .send()
                .await
                .is_ok()
            };
            if admin.is_ok() && proxy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits (bounded) for the process to exit by itself; its status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GETs an admin path.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://127.0.0.1:{}{}", self.admin_port, path))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The sum of the `/metrics` lines starting with `line_prefix`.
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(line_prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded: 5 s) until the proxy counts at least `n` open client connections.
    pub async fn wait_open(&self, n: usize) {
        for _ in 0..250 {
            if self.metric("meraki_proxy_connections_open").await as usize >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the proxy never counted {n} open connections");
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `f` holds (bounded).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Waits (bounded: 5 s) until an async condition holds.
pub async fn eventually_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out");
}
