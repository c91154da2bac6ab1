//! `atp-reliability-node`: one ATP process for the fault and soak tests to
//! start, measure and kill (see `atp_reliability::node_cli`).

fn main() -> std::process::ExitCode {
    atp_reliability::node_cli::main(std::env::args().skip(1))
}
