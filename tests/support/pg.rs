//! A throwaway PostgreSQL cluster from Debian's packages: `initdb` into a temporary directory,
//! password authentication, a loopback port, stopped (and deleted) when dropped. As root (CI),
//! the server runs as the `postgres` user, which PostgreSQL requires.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const USER: &str = "mop";
const PASSWORD: &str = "mop-test-password-4c1d";

/// A running cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    running: bool,
}

fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("an initdb under /usr/lib/postgresql")
}

impl PgCluster {
    /// Creates and starts a cluster with a database `meraki_proxy`.
    pub fn start() -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("mop-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        let as_postgres = nix::unistd::Uid::effective().is_root();
        let mut c = PgCluster {
            // Chosen when the server first starts (PostgreSQL binds its own port).
            port: 0,
            bin: bin_dir(),
            dir,
            as_postgres,
            running: false,
        };
        let pwfile = c.dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if as_postgres {
            c.run_plain(
                "chown",
                &["-R", "postgres:postgres", c.dir.path().to_str().unwrap()],
            );
        }
        c.run(
            "initdb",
            &[
                "-D",
                c.data().to_str().unwrap(),
                "-U",
                USER,
                "--auth=scram-sha-256",
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        c.start_on_a_free_port();
        c.psql("postgres", "CREATE DATABASE meraki_proxy");
        c
    }

    /// Starts the server on a port below the ephemeral range that no one else holds: a port is
    /// tried by PostgreSQL itself (no bind-and-release race); one in use is another try.
    fn start_on_a_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..20 {
            self.port = rand::random::<u16>() % 10_000 + 20_000;
            match self.try_start_server() {
                Ok(()) => return,
                Err(why) => last = why,
            }
        }
        panic!("PostgreSQL did not start on any of 20 ports: {last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The URL the proxy is given.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/meraki_proxy",
            self.port
        )
    }

    /// Creates database `name`; the URL of it.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url().replace("/meraki_proxy", &format!("/{name}"))
    }

    /// The password in the URL (tests check it is never printed).
    pub fn password(&self) -> &'static str {
        PASSWORD
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(&self.bin.join(tool))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn run_plain(&self, program: &str, args: &[&str]) {
        assert!(Command::new(program).args(args).status().unwrap().success());
    }

    /// Runs SQL with psql; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
                "-tAX",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Starts (again) the server, waiting until it accepts connections.
    pub fn start_server(&mut self) {
        if let Err(why) = self.try_start_server() {
            panic!("{why}");
        }
    }

    fn try_start_server(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command(&self.bin.join("pg_ctl"))
            .args([
                "start",
                "-w",
                "-t",
                "30",
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
            ])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start on port {} failed: {}",
                self.port,
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are closed).
    pub fn stop_server(&mut self) {
        if self.running {
            self.run(
                "pg_ctl",
                &[
                    "stop",
                    "-w",
                    "-m",
                    "fast",
                    "-D",
                    self.data().to_str().unwrap(),
                ],
            );
            self.running = false;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command(&self.bin.join("pg_ctl"))
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(self.data())
                .output();
        }
    }
}
