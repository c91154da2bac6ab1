//! The short fuzz run of CI: every committed seed of `fuzz/corpus/<target>/`
//! through its target's function, then a fixed number of deterministic
//! mutations of them — the same functions `cargo fuzz` runs in `fuzz/`.

use atp_reliability::fuzz::{self, Rng, TARGETS};

/// Mutated inputs per target on every `cargo test`.
const MUTATIONS: u64 = 20_000;

fn replay(target: &str) {
    let corpus = fuzz::load_corpus(target);
    assert!(corpus.len() >= 5, "the seed corpus of {target} is missing");
    for (path, data) in &corpus {
        let outcome = std::panic::catch_unwind(|| fuzz::run(target, data));
        assert!(outcome.is_ok(), "{target} fails on seed {}", path.display());
    }
    let seeds: Vec<Vec<u8>> = corpus.into_iter().map(|(_, d)| d).collect();
    let mut rng = Rng::new(0x5eed_0000 + target.len() as u64);
    for n in 0..MUTATIONS {
        let mut input = seeds[rng.below(seeds.len())].clone();
        fuzz::mutate(&mut rng, &mut input, &seeds, 4096);
        let outcome = std::panic::catch_unwind(|| fuzz::run(target, &input));
        assert!(
            outcome.is_ok(),
            "{target} fails on mutation {n}: {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn engine_corpus() {
    replay("engine");
}

#[test]
fn runtime_message_corpus() {
    replay("runtime_message");
}

#[test]
fn llm_calls_corpus() {
    replay("llm_calls");
}

#[test]
fn server_http_corpus() {
    // Every seed is a request the HTTP layer carries: none is skipped.
    for (path, data) in fuzz::load_corpus("server_http") {
        assert!(
            fuzz::server_http_sent(&data),
            "{} was skipped",
            path.display()
        );
    }
    replay("server_http");
}

#[test]
fn every_target_has_a_corpus_and_a_cargo_fuzz_target() {
    for target in TARGETS {
        let file = fuzz::corpus_dir(target).join(format!("../../fuzz_targets/{target}.rs"));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|_| panic!("{} is missing", file.display()));
        assert!(
            text.contains(&format!("atp_reliability::fuzz::{target}(")),
            "{text}"
        );
    }
}

/// The input format of `engine` is the documented one.
#[test]
fn fuzz_inputs_decode_as_documented() {
    let input =
        fuzz::EngineInput::decode(b"POST\n/atp/fz/echo/\n\napplication/json\n\n\n\n{\"text\": 1}");
    assert_eq!(input.method, "POST");
    assert_eq!(input.headers[0].as_deref(), Some(&b"application/json"[..]));
    assert_eq!(input.body, b"{\"text\": 1}");
    assert_eq!(fuzz::EngineInput::decode(&input.encode()), input);
    // A non-JSON value from bytes still reaches the parsers.
    assert!(fuzz::json_from_bytes(&[5, 3, 3, 1, 4, 2]).is_object());
}
