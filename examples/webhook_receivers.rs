//! Receiving ATP webhook deliveries: the signature checked with
//! `atp_registry::webhook::verify_delivery` from an axum handler, an
//! actix-web handler and a Rocket data guard.
//!
//! `cargo run --example webhook_receivers -- axum|actix|rocket [--check]`
//!
//! It serves `POST /atp-webhook` on `127.0.0.1:$PORT` (default 8090)
//! with the secret in `ATP_WEBHOOK_SECRET` (what `register_webhook`
//! answered). With `--check` it sends itself a signed delivery and a
//! forged one, shows how each was answered, and exits.
//!
//! Check the signature on the raw body, before parsing it: the three
//! handlers below take the body as bytes for that reason.

use std::{net::SocketAddr, sync::Arc};

use atp_registry::{
    webhook::{self, SIGNATURE_HEADER, SignatureError},
    wire::WebhookDelivery,
};

/// What a receiver does with a delivery whose signature is good. A
/// delivery may come twice (it is retried until answered 2xx): drop a
/// repeated `delivery_id`.
fn handle(delivery: &WebhookDelivery) {
    println!(
        "  got {} (delivery {}): {}",
        delivery.event, delivery.delivery_id, delivery.data
    );
}

// ------------------------------------------------------------------ axum --

mod with_axum {
    use super::*;
    use axum::{
        Router,
        body::Bytes,
        extract::State,
        http::{HeaderMap, StatusCode},
        routing::post,
    };

    /// The handler: the header and the raw body, checked together.
    async fn receive(
        State(secret): State<Arc<str>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
        match webhook::verify_delivery(secret.as_bytes(), signature, &body) {
            Ok(delivery) => {
                handle(&delivery);
                StatusCode::OK
            }
            Err(SignatureError::Body(_)) => StatusCode::BAD_REQUEST,
            Err(_) => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn router(secret: &str) -> Router {
        Router::new()
            .route("/atp-webhook", post(receive))
            .with_state(Arc::from(secret))
    }

    pub async fn serve(addr: SocketAddr, secret: String, check: bool) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let server = tokio::spawn(async move { axum::serve(listener, router(&secret)).await });
        super::ready("axum", bound, check).await?;
        if !check {
            server.await.map_err(std::io::Error::other)??;
        }
        Ok(())
    }
}

// ------------------------------------------------------------- actix-web --

mod with_actix {
    use super::*;
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

    /// The secret, shared with the handlers.
    struct Secret(String);

    /// The handler: the request's header and the raw body.
    async fn receive(
        secret: web::Data<Secret>,
        req: HttpRequest,
        body: web::Bytes,
    ) -> HttpResponse {
        let signature = req
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok());
        match webhook::verify_delivery(secret.0.as_bytes(), signature, &body) {
            Ok(delivery) => {
                handle(&delivery);
                HttpResponse::Ok().finish()
            }
            Err(SignatureError::Body(_)) => HttpResponse::BadRequest().finish(),
            Err(_) => HttpResponse::Unauthorized().finish(),
        }
    }

    pub async fn serve(addr: SocketAddr, secret: String, check: bool) -> std::io::Result<()> {
        let secret = web::Data::new(Secret(secret));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(secret.clone())
                .route("/atp-webhook", web::post().to(receive))
        })
        .workers(1)
        .bind(addr)?;
        let bound = server.addrs().first().copied().unwrap_or(addr);
        let server = server.run();
        let handle = server.handle();
        let running = actix_web::rt::spawn(server);
        super::ready("actix-web", bound, check).await?;
        if check {
            handle.stop(true).await;
        }
        running.await.map_err(std::io::Error::other)?
    }
}

// ---------------------------------------------------------------- Rocket --

mod with_rocket {
    use super::*;
    use rocket::{
        Request,
        data::{self, Data, FromData, ToByteUnit},
        http::Status,
        outcome::Outcome,
    };

    /// The secret, in Rocket's managed state.
    pub struct Secret(pub String);

    /// A data guard: a delivery whose signature is good. A handler that
    /// takes it runs only for those; the others are answered 400 (not a
    /// delivery), 401 (a bad or missing signature) or 413 (too large).
    pub struct SignedDelivery(pub WebhookDelivery);

    #[rocket::async_trait]
    impl<'r> FromData<'r> for SignedDelivery {
        type Error = String;

        async fn from_data(req: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self> {
            let Some(secret) = req.rocket().state::<Secret>() else {
                return Outcome::Error((Status::InternalServerError, "no secret".into()));
            };
            let body = match data.open(1.mebibytes()).into_bytes().await {
                Ok(body) if body.is_complete() => body.into_inner(),
                Ok(_) => return Outcome::Error((Status::PayloadTooLarge, "too large".into())),
                Err(e) => return Outcome::Error((Status::BadRequest, e.to_string())),
            };
            let signature = req.headers().get_one(SIGNATURE_HEADER);
            match webhook::verify_delivery(secret.0.as_bytes(), signature, &body) {
                Ok(delivery) => Outcome::Success(SignedDelivery(delivery)),
                Err(e @ SignatureError::Body(_)) => {
                    Outcome::Error((Status::BadRequest, e.to_string()))
                }
                Err(e) => Outcome::Error((Status::Unauthorized, e.to_string())),
            }
        }
    }

    /// The handler: it only ever sees signed deliveries.
    #[rocket::post("/atp-webhook", data = "<delivery>")]
    fn receive(delivery: SignedDelivery) -> Status {
        handle(&delivery.0);
        Status::Ok
    }

    pub async fn serve(addr: SocketAddr, secret: String, check: bool) -> std::io::Result<()> {
        let config = rocket::Config {
            address: addr.ip(),
            port: addr.port(),
            log_level: rocket::config::LogLevel::Critical,
            ..rocket::Config::release_default()
        };
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let bound_tx = std::sync::Mutex::new(Some(bound_tx));
        let ignited = rocket::custom(config)
            .manage(Secret(secret))
            .mount("/", rocket::routes![receive])
            .attach(rocket::fairing::AdHoc::on_liftoff("bound", move |r| {
                let c = r.config();
                let addr = SocketAddr::new(c.address, c.port);
                if let Some(tx) = bound_tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(addr);
                }
                Box::pin(async {})
            }))
            .ignite()
            .await
            .map_err(std::io::Error::other)?;
        let shutdown = ignited.shutdown();
        let launched = tokio::spawn(ignited.launch());
        let bound = bound_rx.await.map_err(std::io::Error::other)?;
        super::ready("Rocket", bound, check).await?;
        if check {
            shutdown.notify();
        }
        launched
            .await
            .map_err(std::io::Error::other)?
            .map(|_| ())
            .map_err(std::io::Error::other)
    }
}

// -------------------------------------------------------------- the demo --

/// Prints where the receiver is; with `check`, sends it a signed delivery
/// and a forged one.
async fn ready(framework: &str, addr: SocketAddr, check: bool) -> std::io::Result<()> {
    println!("{framework} receives ATP webhooks at http://{addr}/atp-webhook");
    if !check {
        println!("register it with LlmClient::register_webhook; Ctrl-C stops it");
        return Ok(());
    }
    let secret = secret();
    let body = br#"{"event":"toolkit_connected","webhook_id":"w1","delivery_id":"d1","created_at":"2026-01-01T00:00:00Z","data":{"toolkit_id":"demo"}}"#;
    let signed = webhook::sign(secret.as_bytes(), body);
    let forged = webhook::sign(b"another secret", body);
    for (what, signature, expected) in [
        ("signed", signed.as_str(), 200),
        ("forged", forged.as_str(), 401),
    ] {
        let status = post(addr, signature, body).await?;
        println!("  a {what} delivery was answered {status}");
        if status != expected {
            return Err(std::io::Error::other(format!(
                "a {what} delivery was answered {status}, not {expected}"
            )));
        }
    }
    Ok(())
}

/// A bare HTTP/1.1 POST: the answer's status.
async fn post(addr: SocketAddr, signature: &str, body: &[u8]) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST /atp-webhook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{SIGNATURE_HEADER}: {signature}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .map_err(std::io::Error::other)??;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

fn secret() -> String {
    std::env::var("ATP_WEBHOOK_SECRET").unwrap_or_else(|_| "whsec_example".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let framework = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("axum");
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, not {p:?}"))?,
        Err(_) if check => 0,
        Err(_) => 8090,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match framework {
        "axum" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(with_axum::serve(addr, secret(), check))?,
        "actix" => {
            actix_web::rt::System::new().block_on(with_actix::serve(addr, secret(), check))?
        }
        "rocket" => rocket::execute(with_rocket::serve(addr, secret(), check))?,
        other => {
            return Err(format!("unknown framework {other:?}: use axum, actix or rocket").into());
        }
    }
    Ok(())
}
