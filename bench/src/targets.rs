//! Starting and stopping the servers under test as separate processes:
//! this binary's own `serve` subcommand for the Rust servers, uvicorn and
//! gunicorn for the Python reference.

use std::{
    fmt,
    fs::{self, File},
    io,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use atp_conformance::server::Framework;

use crate::{
    load::{self, RequestSpec},
    procfs::Pinning,
    servers::{HELLO_ANSWER, HELLO_BODY, HELLO_PATH, Mode},
};

/// A server to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A Rust framework, through its ATP adapter or bare.
    Rust(Framework, Mode),
    /// The seed README's FastAPI endpoints under uvicorn.
    FastApi,
    /// `django_atp` under gunicorn.
    Django,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Rust(fw, Mode::Atp) => write!(f, "{fw} + atp-{fw}"),
            Target::Rust(fw, Mode::Bare) => write!(f, "{fw} bare"),
            Target::FastApi => f.write_str("Python FastAPI (uvicorn)"),
            Target::Django => f.write_str("Python django_atp (gunicorn)"),
        }
    }
}

/// The benchmark request: `POST /atp/conformance/hello_world/` with
/// `{"name": "World"}`.
pub fn hello_request() -> RequestSpec {
    RequestSpec::post_json(HELLO_PATH, HELLO_BODY)
}

/// A free port on the loopback interface.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---- The Python reference ----

const PY_FILES: [(&str, &str); 5] = [
    ("atp_tools.py", include_str!("../python/atp_tools.py")),
    ("fastapi_app.py", include_str!("../python/fastapi_app.py")),
    (
        "django_settings.py",
        include_str!("../python/django_settings.py"),
    ),
    ("django_urls.py", include_str!("../python/django_urls.py")),
    ("django_wsgi.py", include_str!("../python/django_wsgi.py")),
];

/// The installation instruction printed when the Python stack is missing.
pub const PY_INSTALL: &str =
    "pip install AgentToolProtocol fastapi 'uvicorn[standard]' django gunicorn";

/// The Python reference stack, as found on this machine.
#[derive(Debug)]
pub struct PythonEnv {
    /// The interpreter (`$ATP_BENCH_PYTHON`, else `python3`).
    pub python: String,
    /// Where the apps were written.
    pub dir: PathBuf,
    /// `Ok(versions)` or why FastAPI can not run.
    pub fastapi: Result<String, String>,
    /// `Ok(versions)` or why Django can not run.
    pub django: Result<String, String>,
}

fn python_check(python: &str, code: &str) -> Result<String, String> {
    match Command::new(python).args(["-c", code]).output() {
        Err(e) => Err(format!("{python} can not be run: {e}")),
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(err.lines().last().unwrap_or("the import failed").to_owned())
        }
    }
}

impl PythonEnv {
    /// Finds the interpreter and the packages and writes the apps into a
    /// fresh directory.
    pub fn detect() -> io::Result<PythonEnv> {
        let python = std::env::var("ATP_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let dir = std::env::temp_dir().join(format!("atp-bench-python-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        for (name, text) in PY_FILES {
            fs::write(dir.join(name), text)?;
        }
        let common = "import sys, importlib.util, importlib.metadata as m, atp_sdk\n\
                      v = lambda p: p + ' ' + m.version(p)\n\
                      base = ['Python ' + sys.version.split()[0], v('AgentToolProtocol')]\n";
        let fastapi = python_check(
            &python,
            &format!(
                "{common}import fastapi_atp.registry, fastapi, uvicorn\n\
                 extra = [v(p) for p in ('uvloop', 'httptools') if importlib.util.find_spec(p)]\n\
                 print(', '.join(base + [v('fastapi'), v('uvicorn')] + extra))"
            ),
        );
        let django = python_check(
            &python,
            &format!(
                "{common}import django_atp.registry, django, gunicorn\n\
                 print(', '.join(base + [v('django'), v('gunicorn')]))"
            ),
        );
        Ok(PythonEnv {
            python,
            dir,
            fastapi,
            django,
        })
    }

    /// Prints a loud banner for each missing part; returns whether any is.
    pub fn warn_missing(&self) -> bool {
        let mut missing = false;
        for (name, state) in [("FastAPI", &self.fastapi), ("Django", &self.django)] {
            if let Err(why) = state {
                missing = true;
                eprintln!();
                eprintln!(
                    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
                );
                eprintln!("!!! PYTHON REFERENCE MISSING: the {name} rows are SKIPPED.");
                eprintln!("!!! {}: {why}", self.python);
                eprintln!("!!! Install it with: {PY_INSTALL}");
                eprintln!("!!! (or set ATP_BENCH_PYTHON to an interpreter that has it)");
                eprintln!(
                    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
                );
                eprintln!();
            }
        }
        missing
    }

    /// Whether `target` can run here.
    pub fn available(&self, target: Target) -> bool {
        match target {
            Target::Rust(..) => true,
            Target::FastApi => self.fastapi.is_ok(),
            Target::Django => self.django.is_ok(),
        }
    }
}

impl Drop for PythonEnv {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---- Server processes ----

/// A running server process; stopped when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `target` on a free loopback port, on the server CPU, and
    /// waits until it answers the benchmark request correctly.
    pub fn start(
        target: Target,
        pinning: &Pinning,
        python: Option<&PythonEnv>,
        workers: usize,
        gunicorn_threads: usize,
        log_dir: &Path,
    ) -> Result<ServerProcess, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = log_dir.join(format!(
            "{}.log",
            target
                .to_string()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        let mut cmd = match target {
            Target::Rust(framework, mode) => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let mut cmd = pinning.command(&exe.to_string_lossy());
                cmd.args([
                    "serve",
                    "--framework",
                    framework.as_str(),
                    "--mode",
                    mode.as_str(),
                    "--addr",
                    &addr.to_string(),
                    "--workers",
                    &workers.to_string(),
                ]);
                cmd
            }
            Target::FastApi | Target::Django => {
                let py = python.ok_or("the Python stack was not detected")?;
                let mut cmd = pinning.command(&py.python);
                cmd.current_dir(&py.dir)
                    .env("PYTHONPATH", &py.dir)
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env(
                        "ATP_BENCH_PY_BASE_URL",
                        format!(
                            "http://127.0.0.1:{}",
                            free_port().map_err(|e| e.to_string())?
                        ),
                    );
                if target == Target::FastApi {
                    cmd.args([
                        "-m",
                        "uvicorn",
                        "fastapi_app:app",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        &port.to_string(),
                        "--workers",
                        "1",
                        "--no-access-log",
                        "--log-level",
                        "warning",
                    ]);
                } else {
                    cmd.args([
                        "-m",
                        "gunicorn",
                        "django_wsgi:application",
                        "--bind",
                        &addr.to_string(),
                        "--workers",
                        "1",
                        "--worker-class",
                        "gthread",
                        "--threads",
                        &gunicorn_threads.max(1).to_string(),
                        "--log-level",
                        "warning",
                    ]);
                }
                cmd
            }
        };
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {target}: {e}"))?;
        let mut server = ServerProcess { child, addr, log };
        server.wait_ready(target)?;
        Ok(server)
    }

    fn wait_ready(&mut self, target: Target) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let request = hello_request();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{target} exited ({status}) before answering:\n{}",
                    self.log_tail()
                ));
            }
            match load::probe_once(self.addr, &request, Duration::from_secs(5)) {
                Ok((status, body)) => {
                    let got: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                    let want: Option<serde_json::Value> = serde_json::from_str(HELLO_ANSWER).ok();
                    if status.is_success() && got.is_some() && got == want {
                        return Ok(());
                    }
                    return Err(format!(
                        "{target} answered {status} {:?}, not {HELLO_ANSWER}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{target} did not answer within 60 s: {e}\n{}",
                        self.log_tail()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server: `SIGTERM`, then `SIGKILL` after 5 s.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}
