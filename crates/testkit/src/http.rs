//! A minimal HTTP/1.1 client: one `GET` per connection (`Connection: close`),
//! read to the end. For tests and the load generator, which need a status,
//! headers and a body from a server of ours, not a general client.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A response: status, headers in order, the body (chunked encoding undone).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `host` (`HOST:PORT`), with extra `headers`.
pub async fn get(host: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<HttpResponse> {
    let stream = TcpStream::connect(host).await.with_context(|| format!("connecting to {host}"))?;
    get_on(stream, host, path, headers).await
}

/// `GET path` from `addr` over a connection from the local address `source`
/// (loopback is all of 127.0.0.0/8): for limits per client address.
pub async fn get_from(
    source: IpAddr,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<HttpResponse> {
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    get_on(stream, &addr.to_string(), path, &[]).await
}

/// `GET path` over `stream`, which the request's `Connection: close` ends.
/// A connection reset after the response still gives the response.
pub async fn get_on(
    mut stream: TcpStream,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw).await
        && raw.is_empty()
    {
        return Err(e.into());
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse { status, headers, body: raw[split + 4..].to_vec() };
    if response.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(&response.body)?;
    }
    Ok(response)
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").context("chunk size line")?;
        let size = std::str::from_utf8(&b[..line_end])?.split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(b.len() >= size + 2, "chunk cut short");
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_and_undoes_chunking() {
        let r = parse(b"HTTP/1.1 200 OK\r\nETag: \"x\"\r\n\r\nbody").unwrap();
        assert_eq!(
            (r.status, r.header("etag"), r.body.as_slice()),
            (200, Some("\"x\""), &b"body"[..])
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(chunked).unwrap().body, b"abcde");
        assert!(parse(b"HTTP/1.1 200").is_err());
    }
}
