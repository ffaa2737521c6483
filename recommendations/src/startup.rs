//! Building the server (catalog, faults, TLS, the services behind their layers, the listener)
//! and running it until shutdown: health turns NOT_SERVING at the signal, then the drain.
//! The layers every call goes through, and their order, are the `Layers` type.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use bookstore_common::{
    fd_limit,
    grpc_call::KnownMethod,
    metrics::Metrics,
    panic::log_panic,
    shutdown::Drained,
    tls::{Role, TlsMode},
    watch::{FileStamps, watch_files},
};
use bookstore_proto::recommendations_server::RecommendationsServer;
use bookstore_server::service::{Ports, Service, ServiceArgs};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::{Server, server::Router};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{
    layer::util::{Identity, Stack},
    util::{Either, MapResponseLayer},
};
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    authz::AuthorizeLayer,
    call_layer::ServerCallLayer,
    catalog::Catalog,
    config::{Config, to_usize},
    edge::{LimitLayer, ProtocolLayer},
    grpc::{Faults, RecommendationsService},
    listener::{ConnLimits, Incoming},
    series::SERIES,
    server_tls::ServerTls,
};

/// Requests are a few bytes; anything much larger is not a real client.
const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// HTTP/2 streams a client may open per connection (above the default call limit, so excess
/// calls reach the limit and get a clear status instead of waiting on flow control).
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Requests carry a handful of small headers.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// No call may run longer than this, whatever deadline (or none) the client sent.
const MAX_CALL_DURATION: Duration = Duration::from_secs(30);

/// The gRPC service name, as the health service reports it (the proto has no package).
pub const SERVICE_NAME: &str = bookstore_proto::recommendations_server::SERVICE_NAME;

/// Every method served, as metrics and logs name them; calls to any other path are counted
/// under `unknown`.
pub const METHODS: &[KnownMethod] = &[
    KnownMethod {
        path: "/Recommendations/Recommend",
        kind: "unary",
    },
    KnownMethod {
        path: "/grpc.health.v1.Health/Check",
        kind: "unary",
    },
    KnownMethod {
        path: "/grpc.health.v1.Health/Watch",
        kind: "server_stream",
    },
    KnownMethod {
        path: "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        kind: "bidi_stream",
    },
    KnownMethod {
        path: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        kind: "bidi_stream",
    },
];

/// The layers around every gRPC service, outermost first: non-gRPC requests refused; metrics,
/// the call's log line and the deadline; call limits, one message per unary call and clean
/// status texts; panics become INTERNAL; caller authorization when TLS is mutual.
type Layers = Stack<
    Either<AuthorizeLayer, Identity>,
    Stack<CatchPanics, Stack<LimitLayer, Stack<ServerCallLayer, Stack<ProtocolLayer, Identity>>>>,
>;

type PanicResponse = fn(Box<dyn std::any::Any + Send>) -> http::Response<tonic::body::Body>;

/// What a caller gets when a handler panics: no detail, the panic is logged.
fn internal_error(panic: Box<dyn std::any::Any + Send>) -> http::Response<tonic::body::Body> {
    log_panic(panic.as_ref());
    tonic::Status::internal("internal error").into_http()
}

/// tower-http's panic catcher answers with a body of its own type; the layers outside it take
/// tonic's.
type CaughtBody = tower_http::body::UnsyncBoxBody<bytes::Bytes, tower_http::BoxError>;
type GrpcBody = fn(http::Response<CaughtBody>) -> http::Response<tonic::body::Body>;

fn to_grpc_body(response: http::Response<CaughtBody>) -> http::Response<tonic::body::Body> {
    response.map(tonic::body::Body::new)
}

/// Where a handler's panic becomes INTERNAL, as a stack of two layers: catching, then giving
/// the answer tonic's body type again.
type CatchPanics = Stack<CatchPanicLayer<PanicResponse>, MapResponseLayer<GrpcBody>>;

fn catch_panics() -> CatchPanics {
    Stack::new(
        CatchPanicLayer::custom(internal_error as PanicResponse),
        MapResponseLayer::new(to_grpc_body as GrpcBody),
    )
}

/// The catalog file, or the nine built-in books.
fn load_catalog(config: &Config) -> anyhow::Result<Catalog> {
    Ok(match &config.catalog_path {
        Some(path) => {
            let catalog = Catalog::load(path, config.catalog_max_bytes)?;
            tracing::info!(path = %path.display(), "catalog loaded");
            catalog
        }
        None => Catalog::builtin(),
    })
}

/// The fault injection settings, each warned about when on.
fn faults(config: &Config) -> Faults {
    let faults = Faults {
        delay: config.artificial_delay(),
        failure_rate: config.failure_rate,
    };
    if !faults.delay.is_zero() {
        tracing::warn!(
            delay_ms = config.artificial_delay_ms,
            "ARTIFICIAL_DELAY_MS is set: every Recommend answer is delayed (fault injection)"
        );
    }
    if !faults.failure_rate.is_off() {
        tracing::warn!(
            failure_rate = %faults.failure_rate,
            "FAILURE_RATE is set: that fraction of Recommend calls fails UNAVAILABLE (fault injection)"
        );
    }
    faults
}

/// The server's TLS, loaded and checked, with the state of its files for the reload watch;
/// none with `TLS_MODE=off`.
fn load_tls(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<Option<(Arc<ServerTls>, FileStamps)>> {
    let mode = config.service.tls.tls_mode;
    mode.warn_if_weak();
    if mode == TlsMode::Off {
        return Ok(None);
    }
    let files = config.service.tls.files(Role::Server);
    let stamps = FileStamps::of(&files);
    let tls = ServerTls::load(files, mode)?;
    tls.record_expiry(metrics);
    Ok(Some((Arc::new(tls), stamps)))
}

/// Recommend and reflection behind the layers every call goes through (the health service is
/// added by the caller, which keeps its reporter).
fn routes(
    config: &Config,
    catalog: Catalog,
    faults: Faults,
    metrics: &Metrics,
) -> anyhow::Result<Router<Layers>> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bookstore_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bookstore_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build the reflection service")?;
    let recommendations =
        RecommendationsServer::new(RecommendationsService::new(Arc::new(catalog), faults))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
    tracing::info!(
        max_calls = config.max_calls,
        max_calls_per_connection = config.max_calls_per_connection,
        "call limits"
    );
    // Without client certificates there is no identity to check; those modes warn instead.
    let authorize = (config.service.tls.tls_mode == TlsMode::Mutual).then(|| {
        let allowed = config.allowed_clients.as_slice();
        tracing::info!(allowed_clients = ?allowed, "caller authorization on");
        AuthorizeLayer::new(allowed.iter().cloned())
    });
    Ok(Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // tonic turns off hyper's bound on streams the server itself resets for a peer's
        // errors (the "MadeYouReset" attack); this is hyper's own default.
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .layer(ProtocolLayer::new(metrics))
        .layer(ServerCallLayer::new(
            metrics.clone(),
            METHODS,
            MAX_CALL_DURATION,
            config.service.log.sampling(),
        ))
        .layer(LimitLayer::new(
            METHODS,
            to_usize(config.max_calls),
            to_usize(config.max_calls_per_connection),
            MAX_REQUEST_BYTES,
        ))
        .layer(catch_panics())
        .layer(tower::util::option_layer(authorize))
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(recommendations))
}

/// A bound, ready-to-run recommendations server.
pub struct Application {
    router: Router<Layers>,
    health: HealthReporter,
    metrics: Metrics,
    /// Our own TLS (None with `TLS_MODE=off`): reloadable, and logging every refused handshake;
    /// with the state of its files when they were loaded.
    tls: Option<(Arc<ServerTls>, FileStamps)>,
    limits: ConnLimits,
    ports: Ports,
    service: ServiceArgs,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Service for Application {
    const NAME: &'static str = "recommendations";
    type Config = Config;

    fn service_args(config: &Config) -> &ServiceArgs {
        &config.service
    }

    /// Loads the catalog and TLS material and binds the listener. Every problem is reported
    /// here, before anything is served.
    async fn build(config: &Config) -> anyhow::Result<Self> {
        config.check().map_err(anyhow::Error::msg)?;
        fd_limit::raise_for(
            config.max_connections + config.max_handshakes + config.service.admin_max_connections,
        );
        let catalog = load_catalog(config)?;
        let faults = faults(config);
        let metrics = Metrics::for_build(
            Self::NAME,
            env!("CARGO_PKG_VERSION"),
            env!("BOOKSTORE_REVISION"),
            SERIES,
        );
        let tls = load_tls(config, &metrics)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        let router = routes(config, catalog, faults, &metrics)?.add_service(health_service);
        let ports = Ports::bind(config.listen_addr, &config.service).await?;
        Ok(Application {
            router,
            health,
            metrics,
            tls,
            limits: config.conn_limits(),
            ports,
            service: config.service.clone(),
        })
    }

    fn ports(&self) -> &Ports {
        &self.ports
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops accepting connections
    /// and gives in-flight calls the grace period to finish.
    async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<Drained> {
        tracing::info!(addr = %self.local_addr(), "recommendations listening");
        let Application {
            router,
            health,
            metrics,
            tls,
            limits,
            ports,
            service,
        } = self;
        let (reload_every, admin_metrics) = (service.tls.reload_interval(), metrics.clone());
        let serve = move |listener, stop: CancellationToken| {
            limits.log();
            let tls = tls.map(|(tls, stamps)| {
                let reload = {
                    let (tls, metrics) = (tls.clone(), metrics.clone());
                    move || {
                        tls.reload()?;
                        tls.record_expiry(&metrics);
                        Ok::<(), bookstore_common::tls::TlsError>(())
                    }
                };
                tokio::spawn(watch_files(
                    reload_every,
                    stop.clone(),
                    stamps,
                    metrics.clone(),
                    reload,
                ));
                tls
            });
            let incoming = Incoming::new(listener, tls, limits, &metrics, stop.clone());
            router.serve_with_incoming_shutdown(incoming, not_serving_at(stop, health))
        };
        ports
            .serve(&service, admin_metrics, shutdown, serve)
            .await
            .context("gRPC server failed")
    }
}

/// Completes once `stop` is cancelled, having turned health to NOT_SERVING for the whole server
/// and for Recommend, so callers watching health move on before the connections close.
async fn not_serving_at(stop: CancellationToken, health: HealthReporter) {
    stop.cancelled().await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        pin::Pin,
        task::{Context, Poll},
    };

    use tonic::body::Body;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// A handler that panics in `call` for `/call`, while its answer is computed for `/poll`,
    /// and answers OK otherwise.
    #[derive(Clone)]
    struct Panics;

    impl Service<http::Request<Body>> for Panics {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            let path = request.uri().path().to_owned();
            assert_ne!(path, "/call", "a panic in call itself");
            Box::pin(async move {
                tokio::task::yield_now().await;
                assert_ne!(path, "/poll", "a panic while polling");
                Ok(tonic::Status::ok("").into_http())
            })
        }
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status")?.to_str().ok()
    }

    #[tokio::test]
    async fn a_panic_in_a_handler_is_internal_and_the_service_keeps_answering() {
        let service = catch_panics().layer(Panics);
        for path in ["/call", "/poll"] {
            let response = service
                .clone()
                .oneshot(request(path))
                .await
                .expect("infallible");
            assert_eq!(grpc_status(&response), Some("13"), "INTERNAL for {path}");
            let message = response.headers()["grpc-message"].to_str().expect("ascii");
            assert_eq!(message, "internal%20error", "no detail of the panic");
        }
        let response = service.oneshot(request("/ok")).await.expect("infallible");
        assert_eq!(grpc_status(&response), Some("0"));
    }
}
