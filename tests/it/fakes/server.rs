//! The server half the HTTP fakes share: a loopback listener served by a thread with a runtime of its own, so
//! one fake works from sync tests (which drive the `ciscale` binary) and async tests (which drive a client)
//! alike, and dropping the fake stops it.

use std::future::Future;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

/// The thread serving a fake. Dropping it stops the server and waits for the thread, so the port and the fake's
/// state are let go of before the next test step.
pub struct ServerThread {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Serves every request on `127.0.0.1:<free port>` with `handler`; returns the address it listens on.
    pub fn start<H, Fut>(handler: H) -> (SocketAddr, ServerThread)
    where
        H: Fn(Method, Uri, HeaderMap, Bytes) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        // Bound here rather than on the thread: the address is known when `start` returns, with no hand-over.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("fake-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fake runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = axum::Router::new().fallback(
                        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                            let handler = handler.clone();
                            async move { handler(method, uri, headers, body).await }
                        },
                    );
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .expect("spawn the fake's thread");
        (addr, ServerThread { shutdown: Some(shutdown), thread: Some(thread) })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
