//! Raw gRPC calls over HTTP/2 (h2 directly): any path, any headers, any body bytes — what a
//! generated client never sends (broken frames, bad wire types, invalid UTF-8).

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use tonic::Code;

/// A call's outcome as the client sees it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `grpc-status`, from the headers (trailers-only) or the trailers.
    pub code: Code,
    /// `grpc-message`, percent-decoded.
    pub message: String,
    /// `grpc-status-details-bin`, decoded.
    pub details: Bytes,
    /// The status as tonic reads it (for its details).
    pub status: tonic::Status,
}

impl Answer {
    /// Bytes of the error a client receives: the message and the details.
    pub fn error_size(&self) -> usize {
        self.message.len() + self.details.len()
    }
}

/// One HTTP/2 connection to the API.
pub struct Raw {
    addr: SocketAddr,
    send: SendRequest<Bytes>,
}

/// `payload` as one gRPC frame (uncompressed).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

impl Raw {
    /// Connects to `addr` (plaintext HTTP/2).
    pub async fn connect(addr: SocketAddr) -> Raw {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Raw { addr, send }
    }

    /// POSTs `body` (sent as is: frame it with [`frame`]) to `path` with `token`, and reads
    /// the whole answer.
    pub async fn call(&mut self, path: &str, token: Option<&str>, body: Vec<u8>) -> Answer {
        let mut send = self.send.clone().ready().await.expect("connection ready");
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let (response, mut stream) = send
            .send_request(req.body(()).expect("request"), false)
            .expect("send request");
        // The server may answer (and reset the stream) before it has read the body.
        let _ = stream.send_data(Bytes::from(body), true);
        let response = response.await.expect("response headers");
        let (parts, mut body) = response.into_parts();
        let mut status = tonic::Status::from_header_map(&parts.headers);
        if status.is_none() {
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("response data");
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
            status = tonic::Status::from_header_map(&trailers);
        }
        let status = status.unwrap_or_else(|| tonic::Status::ok(""));
        Answer {
            code: status.code(),
            message: status.message().to_owned(),
            details: status.details().to_vec().into(),
            status,
        }
    }
}
