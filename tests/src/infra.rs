//! Real PostgreSQL and NATS servers for tests and benchmarks, started as throwaway
//! child processes on free loopback ports (docs/DEPLOY.md's setup, in
//! small): `initdb` into a temporary directory and `postgres`, and
//! `nats-server -p PORT`.
//!
//! Where the binaries are missing the tests say so loudly and skip —
//! unless `ATP_REQUIRE_INFRA=1`, when they fail instead: `.ci/run`
//! installs the Debian packages `postgresql` and `nats-server` and sets it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Set to `1`, missing PostgreSQL or NATS binaries fail the tests instead
/// of skipping them.
const REQUIRE: &str = "ATP_REQUIRE_INFRA";

/// How long a server may take to start.
const START: Duration = Duration::from_secs(30);

fn required() -> bool {
    match std::env::var(REQUIRE) {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!("{REQUIRE}={v:?}: set it to 1 to require PostgreSQL and NATS, or unset it")
        }
        _ => false,
    }
}

/// Says loudly that `what` is missing, or panics when it is required.
fn missing(what: &str) {
    assert!(
        !required(),
        "{what} is not installed and {REQUIRE}=1: install the Debian packages postgresql and nats-server"
    );
    eprintln!(
        "\n*** SKIPPED: {what} is not installed (install the Debian packages postgresql and nats-server; {REQUIRE}=1 turns this skip into a failure) ***\n"
    );
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + START;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start within {START:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("atp-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A PostgreSQL binary: on PATH, else in Debian's versioned directory.
fn pg_bin(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
            .filter(|f| f.is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    })
}

/// A command run as the `postgres` user when this process is root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn give_to_postgres(dir: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown {} to postgres", dir.display());
    }
}

/// An initialised, never started cluster, copied for each server (initdb
/// takes seconds; a copy, milliseconds). Made once per PostgreSQL build
/// and user, and kept in the temporary directory for the next runs.
fn template() -> Option<&'static PathBuf> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let initdb = pg_bin("initdb")?;
            pg_bin("postgres")?;
            let version = Command::new(&initdb)
                .arg("--version")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            let tag: String = version
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let uid = if is_root() { "root" } else { "user" };
            let root = std::env::temp_dir().join(format!("atp-pg-template-{tag}-{uid}"));
            let data = root.join("data");
            if data.join("PG_VERSION").is_file() {
                return Some(data);
            }
            // Made aside and renamed into place: test binaries running at
            // once never see half a template.
            let aside = temp_dir("pg-template");
            give_to_postgres(&aside);
            let out = pg_command(&initdb)
                .arg("-D")
                .arg(aside.join("data"))
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null())
                .output()
                .expect("run initdb");
            assert!(
                out.status.success(),
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if std::fs::rename(&aside, &root).is_err() {
                // Another binary was first: use its template.
                let _ = std::fs::remove_dir_all(&aside);
            }
            data.join("PG_VERSION").is_file().then_some(data)
        })
        .as_ref()
}

/// A PostgreSQL server on a loopback port, with a fresh database; stopped
/// (SIGKILL) and deleted when dropped.
pub struct Postgres {
    child: Option<Child>,
    root: PathBuf,
    /// The loopback port it listens on.
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/atp`.
    pub url: String,
}

impl Postgres {
    /// Starts one, or returns `None` (after saying so) when PostgreSQL is
    /// not installed.
    pub fn start() -> Option<Self> {
        let Some(template) = template() else {
            missing("PostgreSQL (initdb, postgres)");
            return None;
        };
        let root = temp_dir("pg");
        let data = root.join("data");
        let ok = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copy the template cluster");
        give_to_postgres(&root);
        let port = free_port();
        let mut pg = Self {
            child: None,
            root,
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/atp"),
        };
        pg.launch();
        let psql_ok = pg.sql("postgres", "CREATE DATABASE atp");
        assert!(psql_ok, "create the test database");
        Some(pg)
    }

    fn launch(&mut self) {
        let postgres = pg_bin("postgres").expect("postgres");
        let data = self.root.join("data");
        let mut child = pg_command(&postgres)
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            // fsync off: only an OS crash could lose data, and tests do
            // not crash the OS. Commits stay synchronous: a killed server
            // must keep what it acknowledged (the fault runs check it).
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        wait_for_port(self.port, &mut child, "postgres");
        self.child = Some(child);
        // The port accepts before the server takes queries.
        let deadline = Instant::now() + START;
        while !self.sql("postgres", "SELECT 1") {
            assert!(Instant::now() < deadline, "postgres did not take queries");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sql` in database `db` with psql; whether it succeeded (true
    /// without psql: the port answering is then all that is checked).
    pub fn sql(&self, db: &str, sql: &str) -> bool {
        let Some(psql) = pg_bin("psql") else {
            return true;
        };
        Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Its data directory (the cluster's files: tables, WAL).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The postmaster's process id, while it runs (its backends are its
    /// children).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("data").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills the server (SIGKILL: a crash, no shutdown), and waits until
    /// nothing answers on its port any more (its backends outlive the
    /// postmaster for a moment).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // runuser forwards no SIGKILL: kill the postmaster by its pid file.
            kill_postmaster(&self.root.join("data"));
            let _ = c.kill();
            let _ = c.wait();
            let deadline = Instant::now() + START;
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills and starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

fn kill_postmaster(data: &Path) {
    if let Ok(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        && let Some(pid) = pid.lines().next()
    {
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        // Its backends exit once the postmaster is gone; wait for the port.
        let deadline = Instant::now() + START;
        while data.join("postmaster.pid").exists() && Instant::now() < deadline {
            // A killed postmaster leaves its pid file; the next start
            // checks the pid is dead and takes over.
            if !Path::new(&format!("/proc/{}", pid.trim())).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A NATS server on a loopback port; stopped (SIGKILL) when dropped.
pub struct Nats {
    child: Option<Child>,
    dir: PathBuf,
    /// The loopback port it listens on.
    pub port: u16,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
}

fn nats_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let f = PathBuf::from("/usr/sbin/nats-server");
        f.is_file().then_some(f)
    })
}

impl Nats {
    /// Starts one (its `max_payload` raised to 32 MiB, as docs/DEPLOY.md
    /// says to), or returns `None` (after saying so) when nats-server is
    /// not installed.
    pub fn start() -> Option<Self> {
        if nats_bin().is_none() {
            missing("nats-server");
            return None;
        }
        let dir = temp_dir("nats");
        let port = free_port();
        std::fs::write(
            dir.join("nats.conf"),
            format!("listen: 127.0.0.1:{port}\nmax_payload: 33554432\n"),
        )
        .expect("write nats.conf");
        let mut nats = Self {
            child: None,
            dir,
            port,
            url: format!("nats://127.0.0.1:{port}"),
        };
        nats.launch();
        Some(nats)
    }

    fn launch(&mut self) {
        let bin = nats_bin().expect("nats-server");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        wait_for_port(self.port, &mut child, "nats-server");
        self.child = Some(child);
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The nats-server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
