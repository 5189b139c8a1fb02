//! What the proxy writes itself: the one mapping of a [`Refusal`] to status, headers and a
//! Meraki-style body, its own JSON answers, and reading a request body it must check.

use super::{REQUEST_ID_HEADER, UPSTREAM_OUTCOME_HEADER};
use crate::audit::RequestId;
use crate::refusal::Refusal;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

/// The response a refusal is: status, `Content-Type`, `Content-Length`, the proxy's request
/// id, `X-Proxy-Upstream` when it says whether Meraki saw the request, an integer
/// `Retry-After` when there is one (clients such as the Python SDK do `int(Retry-After)`),
/// and the `{"errors": [...]}` body.
pub fn refusal_response(request_id: RequestId, r: &Refusal) -> Result<(ResponseHeader, Bytes)> {
    let body = r.body();
    let mut resp = ResponseHeader::build(r.status, Some(6))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(REQUEST_ID_HEADER, request_id.hex().as_str())?;
    if let Some(u) = r.upstream {
        resp.insert_header(UPSTREAM_OUTCOME_HEADER, u)?;
    }
    match (r.retry_after, r.status) {
        (Some(secs), _) => resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?,
        (None, 429) => resp.insert_header(http::header::RETRY_AFTER, "1")?,
        _ => {}
    }
    Ok((resp, body))
}

/// Writes a refusal through Pingora's `write_error_response`: it says `Connection: close` (the
/// request body may be unread) and is skipped when a response header already went out.
pub async fn write_refusal(
    session: &mut Session,
    request_id: RequestId,
    r: &Refusal,
) -> Result<()> {
    let (resp, body) = refusal_response(request_id, r)?;
    session.as_mut().write_error_response(resp, body).await
}

/// Writes a JSON answer of the proxy's own, with a `Link` header when it is a page.
pub async fn write_json(
    session: &mut Session,
    request_id: RequestId,
    status: u16,
    body: Bytes,
    link: Option<&str>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    if let Some(link) = link {
        resp.insert_header(http::header::LINK, link)?;
    }
    resp.insert_header(REQUEST_ID_HEADER, request_id.hex().as_str())?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Reads the whole request body, up to `limit` bytes, into Pingora's retry buffer (so it is
/// still sent upstream).
pub async fn read_body(session: &mut Session, limit: usize) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            413,
            "bad_request",
            format!("action batch bodies over {limit} bytes are refused"),
        )
    };
    session.as_mut().enable_retry_buffering();
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| match e.etype() {
            // No progress for `[server] body_timeout_secs` (or the whole request's deadline).
            pingora::ErrorType::ReadTimedout => crate::refusal::timed_out("body"),
            _ => Refusal::new(400, "bad_request", "could not read the request body"),
        })?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if session.as_ref().get_retry_buffer().is_none() && !body.is_empty() {
        return Err(too_large());
    }
    Ok(body)
}
