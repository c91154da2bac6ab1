//! An interactive app driven from the LLM side: `cargo run --example app_counter`.
//!
//! A toolkit registers a counter app (its state a Rust struct); the agent
//! starts a session, acts on it until the app ends it, and sees the
//! session is over. Runs an in-process `atp-server` unless `ATP_BASE_URL`
//! is set.

use atp_registry::{
    AppCall, AppReply, Tool, ToolError, ToolKitClient,
    llm::{LlmClient, LlmError},
};
use serde_json::{Value, json};

/// The app's state between actions.
#[derive(serde::Serialize, serde::Deserialize)]
struct Counter {
    count: i64,
    goal: i64,
}

/// The UI the app shows: the count and its buttons.
fn ui(c: &Counter) -> Value {
    json!({
        "type": "card",
        "text": format!("{} of {}", c.count, c.goal),
        "buttons": [{"id": "add", "label": "+1"}, {"id": "add5", "label": "+5"}],
    })
}

async fn counter(call: AppCall<Counter>) -> Result<AppReply<Counter>, ToolError> {
    match call {
        AppCall::Start { params, .. } => {
            let goal = params.get("goal").and_then(Value::as_i64).unwrap_or(10);
            let c = Counter { count: 0, goal };
            Ok(AppReply::new(ui(&c)).state(c))
        }
        AppCall::Action {
            action_data, state, ..
        } => {
            let step = match action_data["button"].as_str() {
                Some("add") => 1,
                Some("add5") => 5,
                other => return Err(ToolError::new(format!("unknown button {other:?}"))),
            };
            let c = Counter {
                count: state.count + step,
                goal: state.goal,
            };
            let reply = AppReply::new(ui(&c));
            // The app ends the session itself when the goal is reached.
            Ok(if c.count >= c.goal {
                reply.terminate()
            } else {
                reply.state(c)
            })
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (base, local) = atp_examples::atp_server().await?;

    // The toolkit side.
    let toolkit = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "Games").with_base_url(&base);
    toolkit.register_typed_app(
        Tool::new("counter")
            .description("Counts up to a goal, one button press at a time.")
            .params(["goal"]),
        counter,
    )?;
    let runtime = atp_examples::serve_in_background(&toolkit, local.as_ref()).await?;

    // The agent side.
    let atp = LlmClient::new("YOUR_ATP_LLM_CLIENT_API_KEY").with_base_url(&base);
    let session = atp
        .start_app("Games", "counter", &json!({"goal": 7}), None)
        .await?;
    println!(
        "session {}: {}",
        session.session_id, session.ui_content["text"]
    );
    for button in ["add", "add5", "add"] {
        let update = atp
            .app_action(&session.session_id, &json!({"button": button}))
            .await?;
        println!(
            "pressed {button:5} -> {}{}",
            update.ui_content["text"],
            if update.terminated {
                " (the app ended the session)"
            } else {
                ""
            }
        );
    }
    match atp
        .app_action(&session.session_id, &json!({"button": "add"}))
        .await
    {
        Err(LlmError::App { code, message }) => println!("one more press: {code}: {message}"),
        other => return Err(format!("expected the session to be over, got {other:?}").into()),
    }

    // A second session, ended by the agent.
    let second = atp
        .start_app("Games", "counter", &Value::Null, None)
        .await?;
    atp.terminate_app(&second.session_id).await?;
    println!("session {} terminated by the agent", second.session_id);

    toolkit.stop();
    runtime.await??;
    Ok(())
}
