//! Serves the conformance fixture with one of the adapters:
//!
//! ```text
//! atp-conformance-server --framework axum|actix|rocket --addr 127.0.0.1:0
//! ```
//!
//! Its first line of standard output is `listening on http://IP:PORT`.

use std::{io::Write, net::SocketAddr, process::ExitCode};

use atp_conformance::server::Framework;
use clap::Parser;

/// Serves the ATP conformance fixture under /atp.
#[derive(Parser)]
#[command(name = "atp-conformance-server", version)]
struct Args {
    /// The adapter: axum, actix or rocket.
    #[arg(long)]
    framework: Framework,
    /// The address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let url = match atp_conformance::serve_fixture_on(args.framework, args.addr) {
        Ok(url) => url,
        Err(e) => {
            eprintln!(
                "can not serve with {} on {}: {e}",
                args.framework, args.addr
            );
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {url}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    // The server runs on its own thread until the process is stopped.
    loop {
        std::thread::park();
    }
}
