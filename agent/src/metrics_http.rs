//! Serves the node's counters ([`shoal_node::metrics`]) as `/metrics` over HTTP.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use shoal_node::metrics::{MetricsSources, render};

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    src: MetricsSources,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics_addr {addr}: cannot listen: {e}"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let src = src.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render(&src),
                    )
                }
            }),
        )
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "only /metrics is served here\n").into_response()
        });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}
