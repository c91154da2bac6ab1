//! The soak driver, short: a few thousand requests of the same mixes the
//! long soak sends (`cargo run --release -p atp-reliability --bin soak`),
//! against each adapter and `atp-server` in child processes — every answer
//! the predicted one, none lost, the server's RSS sampled.

use std::{path::Path, time::Duration};

use atp_reliability::{
    node::{self, Node, test_runtime_options, test_toolkit},
    soak::{self, SoakOptions},
};

fn node_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atp-reliability-node"))
}

fn short(requests: u64) -> SoakOptions {
    SoakOptions {
        requests,
        connections: 4,
        max_time: Duration::from_secs(120),
        sample_every: Duration::from_millis(200),
    }
}

async fn adapter(framework: &str) {
    let child = Node::start(node_bin(), &node::adapter_args(framework))
        .await
        .expect("the adapter starts");
    let mix = soak::adapter_mix();
    let requests = 100 * mix.len() as u64;
    let report = soak::run(child.addr(), mix, short(requests), child.pid()).await;
    eprintln!("{}", report.to_markdown(framework));
    assert!(report.clean(), "{}", report.to_markdown(framework));
    assert_eq!(report.answered, requests);
    assert_eq!(
        report.by_probe.len(),
        soak::adapter_mix().len(),
        "every probe ran"
    );
    assert!(report.rss.len() >= 2 && report.rss.iter().all(|s| s.rss_kib > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_short_soak() {
    adapter("axum").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_short_soak() {
    adapter("actix").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocket_short_soak() {
    adapter("rocket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atp_server_short_soak() {
    let dir = std::env::temp_dir().join(format!("atp-soak-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let child = Node::start(
        node_bin(),
        &node::server_args(
            "127.0.0.1:0",
            &dir.join("soak.sqlite3"),
            soak::SERVER_TOOLKIT_KEY,
            soak::SERVER_LLM_KEY,
            10_000,
        ),
    )
    .await
    .expect("the server starts");
    let toolkit = test_toolkit(soak::SERVER_TOOLKIT_KEY, soak::SERVER_APP, &child.url())
        .with_runtime_options(test_runtime_options());
    let runtime = tokio::spawn({
        let toolkit = toolkit.clone();
        async move { toolkit.start().await }
    });
    // Connected when a call goes through (the server is another process:
    // poll its context, bounded).
    let llm = atp_registry::llm::LlmClient::new(soak::SERVER_LLM_KEY)
        .with_base_url(child.url())
        .with_protocol(atp_registry::llm::LlmProtocol::Http);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut connected = false;
    for _ in 0..1000 {
        tick.tick().await;
        if llm
            .get_toolkit_context(soak::SERVER_APP, "openai", "")
            .await
            .is_ok_and(|c| c["toolkit_connected"] == serde_json::json!(true))
        {
            connected = true;
            break;
        }
    }
    assert!(connected, "the toolkit never got connected");
    let mix = soak::server_mix();
    let requests = 100 * mix.len() as u64;
    let report = soak::run(child.addr(), mix, short(requests), child.pid()).await;
    eprintln!("{}", report.to_markdown("atp-server"));
    assert!(report.clean(), "{}", report.to_markdown("atp-server"));
    assert_eq!(
        report.by_probe.len(),
        soak::server_mix().len(),
        "every probe ran"
    );
    toolkit.stop();
    tokio::time::timeout(Duration::from_secs(20), runtime)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("a clean stop");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
