//! A small HTTP/1.1 client for engines that serve HTTP on this host (vLLM's OpenAI server on
//! 127.0.0.1): bounded GETs, JSON POSTs, and server-sent events read as they arrive. One
//! connection per request; dropping a response closes its connection, which is how the engine
//! learns that the request is no longer wanted (vLLM aborts it).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Largest body read whole (a `/metrics` page, a non-streaming answer).
const BODY_BYTES_MAX: usize = 16 << 20;
/// Largest single server-sent event.
const EVENT_BYTES_MAX: usize = 4 << 20;

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text, cut to a readable length.
    pub fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.body);
        let t = t.trim();
        match t.char_indices().nth(500) {
            Some((i, _)) => format!("{}...", &t[..i]),
            None => t.to_string(),
        }
    }
}

async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<Incoming>, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("{method} {path} on {addr}: {e}"))
}

async fn read_whole(resp: hyper::Response<Incoming>) -> Result<Answer, String> {
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > BODY_BYTES_MAX {
                return Err(format!("answer over {BODY_BYTES_MAX} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Answer {
        status,
        body: Bytes::from(buf),
    })
}

/// `GET path`, whole, within `timeout`.
pub async fn get(port: u16, path: &str, timeout: Duration) -> Result<Answer, String> {
    tokio::time::timeout(timeout, async {
        read_whole(send(port, "GET", path, &[], None).await?).await
    })
    .await
    .map_err(|_| format!("GET {path}: no answer within {timeout:?}"))?
}

/// `POST path` with a JSON body; the whole answer (no time bound: the caller's).
pub async fn post_json(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<Answer, String> {
    read_whole(
        send(
            port,
            "POST",
            path,
            headers,
            Some(body.to_string().into_bytes()),
        )
        .await?,
    )
    .await
}

/// `POST path` with a JSON body, answered with server-sent events (or an error body).
pub async fn post_events(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<Events, Answer> {
    let resp = send(
        port,
        "POST",
        path,
        headers,
        Some(body.to_string().into_bytes()),
    )
    .await
    .map_err(|e| Answer {
        status: 0,
        body: Bytes::from(e),
    })?;
    if resp.status().as_u16() != 200 {
        let status = resp.status().as_u16();
        return Err(read_whole(resp).await.unwrap_or(Answer {
            status,
            body: Bytes::new(),
        }));
    }
    Ok(Events {
        body: resp.into_body(),
        buf: Vec::new(),
    })
}

/// The `data:` payloads of an event stream, one at a time.
pub struct Events {
    body: Incoming,
    buf: Vec<u8>,
}

impl Events {
    /// The next event's data; `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(ev) = take_event(&mut self.buf) {
                if let Some(data) = ev {
                    return Ok(Some(data));
                }
                continue;
            }
            if self.buf.len() > EVENT_BYTES_MAX {
                return Err(format!("an event over {EVENT_BYTES_MAX} bytes"));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(format!("the event stream broke: {e}")),
                None => return Ok(None),
            }
        }
    }
}

/// Takes one whole event (up to a blank line) off the front of `buf`: `Some(Some(data))` for
/// an event with data, `Some(None)` for one without (a comment), `None` when no event is whole.
fn take_event(buf: &mut Vec<u8>) -> Option<Option<String>> {
    let (end, sep) = [&b"\n\n"[..], &b"\r\n\r\n"[..]]
        .iter()
        .filter_map(|sep| {
            buf.windows(sep.len())
                .position(|w| w == *sep)
                .map(|p| (p, sep.len()))
        })
        .min()?;
    let raw: Vec<u8> = buf.drain(..end + sep).collect();
    let text = String::from_utf8_lossy(&raw[..end]);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    Some(if data.is_empty() {
        None
    } else {
        Some(data.join("\n"))
    })
}

#[cfg(test)]
mod tests {
    use super::take_event;

    #[test]
    fn events_split_on_blank_lines_and_across_reads() {
        let mut buf = b"data: {\"a\":1}\n\n: comment\n\ndata: [DO".to_vec();
        assert_eq!(take_event(&mut buf), Some(Some("{\"a\":1}".into())));
        assert_eq!(take_event(&mut buf), Some(None));
        assert_eq!(take_event(&mut buf), None);
        buf.extend_from_slice(b"NE]\r\n\r\n");
        assert_eq!(take_event(&mut buf), Some(Some("[DONE]".into())));
        assert!(buf.is_empty());
    }
}
