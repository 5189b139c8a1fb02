//! The command line: `run` (default), `check`, `hash-key`, `grants list|import`.

use crate::clock::{describe_expiry, describe_past, now_unix};
use crate::config::Config;
use crate::report::chain;
use crate::secret::Secret;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// meraki-oauth-proxy: Meraki API-key scripts in, OAuth 2.0 bearer tokens out.
#[derive(Parser, Debug)]
#[command(name = "meraki-oauth-proxy", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "proxy.toml",
        env = "MERAKI_PROXY_CONFIG"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print what it would serve (no secrets); with a
    /// PostgreSQL store, also connect to it and check the store key.
    Check {
        /// Do not connect to a PostgreSQL store (validate the file only).
        #[arg(long)]
        no_connect: bool,
    },
    /// Read a client key from standard input and print its SHA-256 for `key_sha256`.
    HashKey,
    /// Manage OAuth grants.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Manage the token store's encryption key.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Hand out client keys.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Check the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `audit` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk audit files along their hash chain, oldest first (e.g. `audit.jsonl.2 audit.jsonl.1
    /// audit.jsonl`), check every checkpoint's HMAC, and name the first line deleted, inserted,
    /// edited or moved, or a missing tail. Exit status 0: intact; 1: a problem was found.
    Verify {
        /// Environment variable holding the HMAC key (`[audit] hmac_key_env`).
        #[arg(long, conflicts_with = "key_file")]
        key_env: Option<String>,
        /// File holding the HMAC key (`[audit] hmac_key_file`).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The files, in the order they were written.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// `clients` subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Print a fresh random client key (once: the proxy stores only its digest) and the
    /// `[[clients]]` block for proxy.toml. To rotate a script's key, add the new digest to the
    /// client's `key_sha256` list and give the old one a `key_expires` time.
    New {
        /// The client's name (letters, digits, '-' or '_').
        #[arg(long)]
        name: String,
        /// The integration whose grants serve it.
        #[arg(long)]
        integration: String,
        /// An organization it may act on (repeat for several).
        #[arg(long = "org", required = true)]
        orgs: Vec<String>,
        /// A method it may use (repeat; default: every method).
        #[arg(long = "method")]
        methods: Vec<String>,
    },
}

/// `store` subcommands.
#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Print a new random 32-byte key (base64) for `store.key_env` / `store.key_file`.
    GenKey,
    /// Re-seal every token under a new key (stop the proxy first), then switch the
    /// configuration to the new key.
    RotateKey {
        /// Environment variable holding the new key.
        #[arg(long, conflicts_with = "new_key_file")]
        new_key_env: Option<String>,
        /// File holding the new key.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
}

/// `grants` subcommands.
#[derive(Subcommand, Debug)]
pub enum GrantsCommand {
    /// List grants (no secrets).
    List,
    /// Seed a grant from an existing refresh token: it is refreshed at once and the rotated
    /// token stored.
    Import {
        /// The integration the refresh token belongs to.
        #[arg(long)]
        integration: String,
        /// An organization the grant serves (repeat for several).
        #[arg(long = "org", required = true)]
        orgs: Vec<String>,
        /// File holding the refresh token ("-": standard input).
        #[arg(long)]
        refresh_token_file: PathBuf,
    },
    /// Print the consent link of an integration and wait until an org admin has connected it
    /// (the running proxy's admin listener handles the callback).
    Connect {
        #[arg(long)]
        integration: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Revoke a grant at Meraki (RFC 7009) and delete it; if Meraki does not confirm, the grant
    /// is kept.
    Revoke {
        #[arg(long)]
        integration: String,
        /// An organization the grant serves.
        #[arg(long)]
        org: String,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("meraki-oauth-proxy: {msg}");
    ExitCode::FAILURE
}

/// Fails with an error and its causes.
fn fail_chain(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    fail(chain(e))
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command.unwrap_or(Command::Run) {
        Command::Store(StoreCommand::GenKey) => {
            println!("{}", crate::seal::StoreKey::generate());
            ExitCode::SUCCESS
        }
        Command::Clients(ClientsCommand::New {
            name,
            integration,
            orgs,
            methods,
        }) => new_client(&name, &integration, &orgs, &methods),
        Command::Audit(AuditCommand::Verify {
            key_env,
            key_file,
            files,
        }) => audit_verify(key_env, key_file, &files),
        Command::HashKey => {
            let mut key = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut key) {
                return fail(format!("cannot read standard input: {e}"));
            }
            if key.trim().is_empty() {
                return fail("no key on standard input");
            }
            println!("{}", crate::identity::hash_key(&key));
            ExitCode::SUCCESS
        }
        command => {
            let config = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match command {
                Command::Check { no_connect } => {
                    print!("{config}");
                    if let (Some(url), false) = (&config.store_url, no_connect) {
                        match probe_store(url, &config) {
                            Ok(said) => println!("{said}"),
                            Err(e) => return fail_chain(&e),
                        }
                    }
                    println!("configuration OK");
                    ExitCode::SUCCESS
                }
                Command::Run => run(config),
                Command::Grants(g) => grants(config, g),
                Command::Store(StoreCommand::RotateKey {
                    new_key_env,
                    new_key_file,
                }) => rotate_key(&config, new_key_env, new_key_file),
                Command::HashKey
                | Command::Store(StoreCommand::GenKey)
                | Command::Clients(_)
                | Command::Audit(_) => ExitCode::SUCCESS,
            }
        }
    }
}

/// `audit verify`: no configuration needed (it runs where the logs are shipped to).
fn audit_verify(key_env: Option<String>, key_file: Option<PathBuf>, files: &[PathBuf]) -> ExitCode {
    let key = match (key_env, key_file) {
        (Some(var), _) => match std::env::var(&var) {
            Ok(v) if !v.trim().is_empty() => Some(Secret::new(v.trim())),
            _ => return fail(format!("environment variable {var} is not set or empty")),
        },
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(v) => Some(Secret::new(v.trim())),
            Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
        },
        (None, None) => None,
    };
    match crate::audit::verify::verify_files(files, key.as_ref()) {
        Ok(report) => {
            print!("{report}");
            if report.finding.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(format!("cannot read the audit files: {e}")),
    }
}

/// Connects to a PostgreSQL store (without changing it) and checks the store key.
fn probe_store(
    url: &crate::secret::Secret,
    config: &Config,
) -> Result<String, crate::token::StoreError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::token::StoreError::Pool(e.to_string()))?;
    rt.block_on(crate::token::PgStore::probe(url, &config.store_key))
}

fn new_client(name: &str, integration: &str, orgs: &[String], methods: &[String]) -> ExitCode {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return fail(format!(
            "--name: expected letters, digits, '-' or '_', got {name:?}"
        ));
    }
    if let Some(o) = orgs.iter().find(|o| !crate::config::valid_org_id(o)) {
        return fail(format!(
            "--org: expected a Meraki organization ID (digits), got {o:?}"
        ));
    }
    use base64::Engine as _;
    let key = format!(
        "mop_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Client key for {name} (shown once; give it to the script and keep no other copy):");
    println!();
    println!("  {key}");
    println!();
    println!("Add to proxy.toml (the proxy keeps only the key's SHA-256):");
    println!();
    println!("[[clients]]");
    println!("name = {name:?}");
    println!("key_sha256 = {:?}", crate::identity::hash_key(&key));
    println!("integration = {integration:?}");
    println!("organizations = [{}]", list(orgs));
    if !methods.is_empty() {
        let upper: Vec<String> = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        println!("methods = [{}]", list(&upper));
    }
    ExitCode::SUCCESS
}

fn rotate_key(config: &Config, env: Option<String>, file: Option<PathBuf>) -> ExitCode {
    let text = match (env, file) {
        (Some(var), None) => match std::env::var(&var) {
            Ok(v) => v,
            Err(_) => {
                return fail(format!(
                    "--new-key-env: environment variable {var} is not set"
                ))
            }
        },
        (None, Some(f)) => match std::fs::read_to_string(&f) {
            Ok(v) => v,
            Err(e) => return fail(format!("--new-key-file {}: {e}", f.display())),
        },
        _ => return fail("give the new key with --new-key-env VAR or --new-key-file FILE"),
    };
    let new = match crate::seal::StoreKey::parse(&text) {
        Ok(k) => k,
        Err(e) => return fail(format!("new key: {e}")),
    };
    let (rekeyed, place) = match &config.store_url {
        Some(url) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            let done = rt.block_on(async {
                let store = crate::token::PgStore::open(
                    url,
                    config.store_key.clone(),
                    2,
                    std::time::Duration::from_secs(15),
                )
                .await?;
                store.rekey(&new).await
            });
            (done, crate::config::describe_pg_url(url))
        }
        None => {
            let done =
                crate::token::SqliteStore::open(&config.store_path, config.store_key.clone())
                    .and_then(|store| store.rekey(&new));
            (done, config.store_path.display().to_string())
        }
    };
    match rekeyed {
        Ok(n) => {
            println!(
                "re-sealed {n} grant(s) in {place} under key {new:?}; now point store.key_env/key_file at the new key and start the proxy (every instance)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn run(config: Config) -> ExitCode {
    let listeners = match crate::server::Listeners::bind(&config) {
        Ok(l) => l,
        Err(e) => return fail_chain(&e),
    };
    let path = config.source.clone();
    let launch = crate::server::Launch {
        config,
        loader: std::sync::Arc::new(move || Config::load(&path)),
        listeners,
        shutdown: Box::new(crate::server::Signals),
        exit_when_drained: true,
    };
    match crate::server::run(launch) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_chain(&e),
    }
}

fn grants(config: Config, cmd: GrantsCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    rt.block_on(async move {
        let parts = match crate::server::parts(&config).await {
            Ok(p) => p,
            Err(e) => return fail_chain(&e),
        };
        match cmd {
            GrantsCommand::List => {
                let now = now_unix();
                println!("ID     INTEGRATION      ORGANIZATIONS            STATUS                   TOKEN        EXPIRES                LAST USED");
                for g in parts.grants.all() {
                    let st = g.state();
                    let expires = describe_expiry(st.expires_at, now);
                    let last = describe_past(g.last_used());
                    println!(
                        "{:<6} {:<16} {:<24} {:<24} {:<12} {:<22} {}",
                        g.id,
                        g.integration().name,
                        g.organizations.join(","),
                        st.status.as_str(),
                        st.fingerprint().map_or("-", |f| &**f),
                        expires,
                        last
                    );
                }
                ExitCode::SUCCESS
            }
            GrantsCommand::Revoke { integration, org } => {
                let Some(grant) = parts.grants.get(&integration, &org).await else {
                    return fail(format!("no grant of integration {integration:?} serves organization {org}"));
                };
                match parts.grants.revoke(&grant).await {
                    Ok(()) => {
                        println!("revoked and deleted grant {} ({})", grant.id, grant.label());
                        parts.audit.close();
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail_chain(&e),
                }
            }
            GrantsCommand::Connect { integration, wait_secs } => connect(&config, &parts, &integration, wait_secs).await,
            GrantsCommand::Import { integration, orgs, refresh_token_file } => {
                for o in &orgs {
                    if !crate::config::valid_org_id(o) {
                        return fail(format!("--org: expected a Meraki organization ID (digits), got {o:?}"));
                    }
                }
                let mut token = String::new();
                let read = if refresh_token_file.as_os_str() == "-" {
                    std::io::stdin().read_to_string(&mut token).map(|_| ())
                } else {
                    std::fs::read_to_string(&refresh_token_file).map(|t| token = t)
                };
                if let Err(e) = read {
                    return fail(format!("--refresh-token-file {}: {e}", refresh_token_file.display()));
                }
                let token = token.trim();
                if token.is_empty() {
                    return fail(format!("--refresh-token-file {}: empty", refresh_token_file.display()));
                }
                match parts.grants.import(&integration, &orgs, Secret::new(token)).await {
                    Ok(g) => {
                        let st = g.state();
                        println!(
                            "imported grant {} for integration {} organizations {}: refreshed, token {} valid until {}",
                            g.id,
                            integration,
                            orgs.join(","),
                            st.fingerprint().map_or("-", |f| &**f),
                            crate::clock::rfc3339(st.expires_at)
                        );
                        parts.audit.close();
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail_chain(&e),
                }
            }
        }
    })
}

async fn connect(
    config: &Config,
    parts: &crate::server::Parts,
    integration: &str,
    wait_secs: u64,
) -> ExitCode {
    if config.integration(integration).is_none() {
        return fail(format!(
            "no integration named {integration:?} in the configuration"
        ));
    }
    let Some(admin) = config.admin_listen else {
        return fail(
            "server.admin_listen is not set: the consent callback is served by the admin listener",
        );
    };
    let base = format!("http://{admin}");
    let up = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(http) => http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()),
        Err(e) => return fail_chain(&e),
    };
    if up {
        println!("Open this link as an admin of the organization(s) to connect, and approve:");
    } else {
        println!("The proxy does not answer on {base} yet; start it (`meraki-oauth-proxy run`), then open:");
    }
    println!("  {base}/oauth/connect?integration={integration}");
    let before: Vec<i64> = parts.grants.all().iter().map(|g| g.id).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if let Err(e) = parts.grants.reload().await {
            return fail_chain(&e);
        }
        if let Some(g) = parts
            .grants
            .all()
            .into_iter()
            .find(|g| g.integration().name == integration && !before.contains(&g.id))
        {
            println!(
                "connected: grant {} for organization(s) {}",
                g.id,
                g.organizations.join(",")
            );
            return ExitCode::SUCCESS;
        }
    }
    fail(format!(
        "no new grant for {integration} after {wait_secs} s"
    ))
}

fn init_logging() {
    use tracing_log::AsLog;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Pingora logs through `log`. Forward only what the filter can keep: at TRACE (LogTracer's
    // default) every Pingora `debug!` on the request path would go through tracing first.
    let level = filter
        .max_level_hint()
        .map_or(tracing_log::log::LevelFilter::Trace, |l| l.as_log());
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(level)
        .init();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
