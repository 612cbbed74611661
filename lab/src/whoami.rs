//! `shoal whoami`: the lab's echo server. An HTTP GET answers with the hostname, task,
//! service, every IP of the namespace and the client address it saw (text, or JSON with
//! `?format=json`); a UDP datagram gets the same (JSON when the datagram starts with `json`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Whoami {
    pub hostname: String,
    pub task: String,
    pub service: String,
    pub ips: Vec<IpAddr>,
    pub remote_addr: SocketAddr,
}

impl Whoami {
    pub fn text(&self) -> String {
        let mut s = format!(
            "Hostname: {}\nTask: {}\nService: {}\n",
            self.hostname, self.task, self.service
        );
        for ip in &self.ips {
            s.push_str(&format!("IP: {ip}\n"));
        }
        s.push_str(&format!("RemoteAddr: {}\n", self.remote_addr));
        s
    }
}

#[derive(Clone)]
struct Identity {
    hostname: String,
    task: String,
    service: String,
    ips: Vec<IpAddr>,
}

impl Identity {
    fn now() -> Self {
        Identity {
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            task: std::env::var("SHOAL_TASK_NAME").unwrap_or_default(),
            service: std::env::var("SHOAL_SERVICE_NAME").unwrap_or_default(),
            ips: shoal_node::listening::local_ips(),
        }
    }
    fn answer(&self, remote: SocketAddr) -> Whoami {
        Whoami {
            hostname: self.hostname.clone(),
            task: self.task.clone(),
            service: self.service.clone(),
            ips: self.ips.clone(),
            remote_addr: remote,
        }
    }
}

/// Serves HTTP on TCP `port` and the echo on UDP `udp_port` until the process ends.
pub async fn run(port: u16, udp_port: u16) -> anyhow::Result<()> {
    let id = Identity::now();
    let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding TCP port {port}"))?;
    let udp = tokio::net::UdpSocket::bind(("0.0.0.0", udp_port))
        .await
        .with_context(|| format!("binding UDP port {udp_port}"))?;
    // One write: a line written in pieces is several partial records in podman's log,
    // and `podman logs --tail N` counts records, not lines.
    let line = format!(
        "whoami: {} serving HTTP on :{port}, UDP on :{udp_port}\n",
        id.hostname
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    let uid = id.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let w = uid.answer(from);
            let out = if buf[..n].starts_with(b"json") {
                serde_json::to_string(&w).unwrap_or_default()
            } else {
                w.text()
            };
            let _ = udp.send_to(out.as_bytes(), from).await;
        }
    });
    loop {
        let (stream, remote) = match tcp.accept().await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let id = id.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let w = id.answer(remote);
                async move {
                    let json = req
                        .uri()
                        .query()
                        .is_some_and(|q| q.split('&').any(|kv| kv == "format=json"));
                    let (ctype, body) = if json {
                        (
                            "application/json",
                            serde_json::to_string(&w).unwrap_or_default(),
                        )
                    } else {
                        ("text/plain", w.text())
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_everything() {
        let w = Whoami {
            hostname: "h".into(),
            task: "web.1".into(),
            service: "web".into(),
            ips: vec!["10.0.1.3".parse().unwrap()],
            remote_addr: "10.0.1.4:5555".parse().unwrap(),
        };
        assert_eq!(
            w.text(),
            "Hostname: h\nTask: web.1\nService: web\nIP: 10.0.1.3\nRemoteAddr: 10.0.1.4:5555\n"
        );
        let back: Whoami = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back, w);
    }
}
