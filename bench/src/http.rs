//! The small HTTP client the modes use besides the load generator: one GET
//! on a fresh connection, and a URL's numeric socket address.

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// One GET on a fresh connection: status and body.
async fn get(url: &str) -> Result<(u16, String)> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(80)
    );
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path())
        .header("host", "bench")
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Status of a GET (used while waiting for servers).
pub async fn http_get_status(url: &str) -> Result<u16> {
    Ok(get(url).await?.0)
}

pub async fn get_text(url: &str) -> Result<String> {
    Ok(get(url).await?.1)
}

pub fn addr_of(url: &str) -> Result<SocketAddr> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.host().context("URL without host")?;
    let port = uri.port_u16().unwrap_or(80);
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{url}: use a numeric address"))
}
