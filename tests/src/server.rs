//! Starting the fixture (or any [`Engine`]) on each framework, from a
//! background thread with its own runtime.

use std::{fmt, io, net::SocketAddr, str::FromStr, sync::mpsc, thread};

use atp_registry::Engine;

/// The frameworks with an ATP adapter in this workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framework {
    /// `atp-axum`.
    Axum,
    /// `atp-actix`.
    Actix,
    /// `atp-rocket`.
    Rocket,
}

impl Framework {
    /// All three.
    pub const ALL: [Framework; 3] = [Framework::Axum, Framework::Actix, Framework::Rocket];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Axum => "axum",
            Framework::Actix => "actix",
            Framework::Rocket => "rocket",
        }
    }
}

impl fmt::Display for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Framework {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "axum" => Ok(Framework::Axum),
            "actix" | "actix-web" => Ok(Framework::Actix),
            "rocket" => Ok(Framework::Rocket),
            other => Err(format!(
                "unknown framework {other:?}: use axum, actix or rocket"
            )),
        }
    }
}

/// Serves `engine` with `framework` on `addr` (port 0 allowed) from a
/// background thread with its own runtime, and returns the bound address
/// once the server accepts connections. The server runs until the process
/// ends.
pub fn spawn(framework: Framework, engine: Engine, addr: SocketAddr) -> io::Result<SocketAddr> {
    match framework {
        Framework::Axum => spawn_axum(engine, addr),
        Framework::Actix => spawn_actix(engine, addr),
        Framework::Rocket => spawn_rocket(engine, addr),
    }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn spawn_axum(engine: Engine, addr: SocketAddr) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = runtime()?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    thread::Builder::new()
        .name("atp-axum".into())
        .spawn(move || {
            let app: axum::Router = atp_axum::Atp::from(engine).into();
            if let Err(e) = runtime.block_on(async move { axum::serve(listener, app).await }) {
                eprintln!("axum server stopped: {e}");
            }
        })?;
    Ok(local)
}

fn spawn_actix(engine: Engine, addr: SocketAddr) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let (tx, rx) = mpsc::channel::<io::Result<()>>();
    thread::Builder::new()
        .name("atp-actix".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = actix_web::HttpServer::new(move || {
                    actix_web::App::new().service(atp_actix::Atp::from(engine.clone()))
                })
                .workers(2)
                .disable_signals()
                .listen(listener);
                match server {
                    Ok(server) => {
                        let _ = tx.send(Ok(()));
                        if let Err(e) = server.run().await {
                            eprintln!("actix-web server stopped: {e}");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
    rx.recv()
        .map_err(|_| io::Error::other("the actix-web thread ended before listening"))??;
    Ok(local)
}

fn spawn_rocket(engine: Engine, addr: SocketAddr) -> io::Result<SocketAddr> {
    let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
    let config = rocket::Config {
        address: addr.ip(),
        port: addr.port(),
        workers: 2,
        log_level: rocket::config::LogLevel::Off,
        cli_colors: false,
        // No signal handlers: SIGTERM and Ctrl-C end the whole process, as
        // they do for the other two frameworks here.
        shutdown: rocket::config::Shutdown {
            ctrlc: false,
            #[cfg(unix)]
            signals: Default::default(),
            ..Default::default()
        },
        ..rocket::Config::release_default()
    };
    let ready = tx.clone();
    let rocket = rocket::custom(config)
        .mount("/", atp_rocket::Atp::from(engine))
        .attach(rocket::fairing::AdHoc::on_liftoff(
            "report address",
            move |rocket| {
                Box::pin(async move {
                    let c = rocket.config();
                    let _ = ready.send(Ok(SocketAddr::new(c.address, c.port)));
                })
            },
        ));
    thread::Builder::new()
        .name("atp-rocket".into())
        .spawn(move || {
            if let Err(e) = rocket::execute(rocket.launch()) {
                let _ = tx.send(Err(e.to_string()));
            }
        })?;
    rx.recv()
        .map_err(|_| io::Error::other("the Rocket thread ended before listening"))?
        .map_err(io::Error::other)
}
