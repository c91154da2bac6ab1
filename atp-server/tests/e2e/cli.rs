//! The `atp-server` binary: flags, dev mode, a config file.

use std::{process::Stdio, time::Duration};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::common::*;

/// Reads the child's log until it says where it listens.
pub(crate) async fn listening_addr(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let find = async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            if line.contains("atp-server listening")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let digits: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                return format!("127.0.0.1:{digits}");
            }
        }
        panic!("the server exited before listening")
    };
    tokio::time::timeout(WAIT, find)
        .await
        .expect("listening in time")
}

fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atp-server"));
    c.env("NO_COLOR", "1")
        .env_remove("ATP_TOOLKIT_API_KEYS")
        .env_remove("ATP_LLM_API_KEYS")
        .env_remove("ATP_SECRETS_KEY")
        .env_remove("ATP_SECRETS_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn the_binary_serves_with_flags_and_a_config_file() {
    bounded(Duration::from_secs(60), async {
        // No keys: dev mode, any key.
        let mut child = binary()
            .args(["--addr", "127.0.0.1:0", "--db", ":memory:"])
            .spawn()
            .expect("starts");
        let addr = listening_addr(&mut child).await;
        let (status, v) = http_json("GET", &format!("http://{addr}/health"), &[], None).await;
        assert_eq!((status, v), (200, json!({"status": "ok"})));
        let (status, v) = http_json(
            "POST",
            &format!("http://{addr}/api/v1/atp/llm-client/process/"),
            &[("authorization", "ApiKey whatever")],
            Some(&json!({"type": "get_toolkit_context", "toolkit_id": "none"})),
        )
        .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (404, Some("toolkit_not_found"))
        );
        let _ = child.kill().await;

        // Keys from a config file (and the environment): others are refused.
        let dir = std::env::temp_dir().join(format!("atp-server-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("atp.toml");
        std::fs::write(
            &config,
            "db = \":memory:\"\nllm_api_keys = [\"from-file\"]\ntask_timeout_secs = 5\n",
        )
        .expect("write");
        let mut child = binary()
            .args(["--addr", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("ATP_LLM_API_KEYS", "from-env")
            .spawn()
            .expect("starts");
        let addr = listening_addr(&mut child).await;
        let process = format!("http://{addr}/api/v1/atp/llm-client/process/");
        let body = json!({"type": "get_toolkit_context", "toolkit_id": "none"});
        for (key, status) in [("from-file", 404), ("from-env", 404), ("whatever", 401)] {
            let auth = format!("ApiKey {key}");
            let (got, _) =
                http_json("POST", &process, &[("authorization", &auth)], Some(&body)).await;
            assert_eq!(got, status, "{key}");
        }
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&dir);

        // Dev mode refuses a non-loopback address.
        let out = binary()
            .args(["--dev", "--db", ":memory:", "--addr", "0.0.0.0:0"])
            .output()
            .await
            .expect("runs");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    })
    .await;
}
