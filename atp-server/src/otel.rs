//! OpenTelemetry export (feature `otel`): the server's spans, sent over
//! OTLP/HTTP (protobuf) by the server's own hyper client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), atp_server::otel::OtelError> {
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! // `OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318` in the environment.
//! if let Some(otel) = atp_server::otel::Otel::from_env()? {
//!     let subscriber = tracing_subscriber::registry().with(otel.layer());
//!     tracing::subscriber::set_global_default(subscriber).ok();
//!     // … serve; at the end, send what is left:
//!     otel.shutdown().await;
//! }
//! # Ok(()) }
//! ```

use std::{fmt, future::Future, pin::Pin, time::Duration};

use atp_registry::net::HttpClient as Outbound;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};

/// How long one export may take when `OTEL_EXPORTER_OTLP_TIMEOUT` does not
/// say (the OTLP default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry export: {0}")]
pub struct OtelError(String);

/// The OTLP exporter of the server's spans: a `tracing` layer, and the
/// provider behind it (flush it with [`Otel::shutdown`]).
pub struct Otel {
    provider: SdkTracerProvider,
}

impl fmt::Debug for Otel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The provider's config may hold headers (a collector's key).
        f.debug_struct("Otel").finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Otel {
    /// The exporter the standard environment asks for, or `None` when it
    /// asks for none: no `OTEL_EXPORTER_OTLP_ENDPOINT` nor
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_SDK_DISABLED=true`.
    /// The exporter reads the endpoint, headers and timeout variables;
    /// the resource reads `OTEL_SERVICE_NAME` (else `atp-server`) and
    /// `OTEL_RESOURCE_ATTRIBUTES`. Call it inside a tokio runtime.
    pub fn from_env() -> Result<Option<Self>, OtelError> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        Self::build(None).map(Some)
    }

    /// An exporter to `traces_url` (the full URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces`), whatever the environment's
    /// endpoint says. Call it inside a tokio runtime.
    pub fn to_endpoint(traces_url: &str) -> Result<Self, OtelError> {
        Self::build(Some(traces_url))
    }

    fn build(endpoint: Option<&str>) -> Result<Self, OtelError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| OtelError("must be set up inside a tokio runtime".into()))?;
        let client = Exporting {
            outbound: Outbound::new(),
            runtime,
        };
        let mut exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(client);
        if let Some(url) = endpoint {
            exporter = exporter.with_endpoint(url);
        }
        let exporter = exporter.build().map_err(|e| OtelError(e.to_string()))?;
        let mut resource = Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("atp-server");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans and
    /// exports them.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("atp-server"))
    }

    /// Sends the spans not sent yet, waiting for the export (at most its
    /// timeout).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("could not export the last spans: {e}");
        }
    }

    /// Sends the spans not sent yet and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("could not export the last spans: {e}");
        }
    }
}

/// The exporter's HTTP client: atp-server's hyper client, on the server's
/// runtime (the exporter's batch thread has none).
struct Exporting {
    outbound: Outbound,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for Exporting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporting").finish_non_exhaustive()
    }
}

type Sent = Result<Response<Bytes>, HttpError>;

impl HttpClient for Exporting {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Sent> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let outbound = self.outbound.clone();
        let runtime = self.runtime.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            let url = head.uri.to_string();
            let mut content_type = "application/x-protobuf".to_owned();
            let mut headers: Vec<(String, String)> = Vec::new();
            for (name, value) in &head.headers {
                let Ok(value) = value.to_str() else { continue };
                if name.as_str() == "content-type" {
                    value.clone_into(&mut content_type);
                } else {
                    headers.push((name.as_str().to_owned(), value.to_owned()));
                }
            }
            let method = head.method;
            let sent = runtime.spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                outbound
                    .send(
                        method,
                        &url,
                        &headers,
                        Some((&content_type, body)),
                        EXPORT_TIMEOUT,
                    )
                    .await
            });
            let (status, body) = sent.await.map_err(|e| Box::new(e) as HttpError)??;
            Ok(Response::builder().status(status).body(body)?)
        })
    }
}
