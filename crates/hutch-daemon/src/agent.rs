//! The host side of the agent protocol: one multiplexed connection per VM over the unix socket
//! QEMU serves for the VM's virtio-serial port.

use hutch_proto::{Decoder, Frame, Hello, HelloAck, Kind, Request};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("connection to the guest agent was lost")]
    Lost,
    #[error("agent protocol: {0}")]
    Proto(String),
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>>;

pub struct AgentClient {
    out: mpsc::UnboundedSender<Vec<u8>>,
    routes: Routes,
    next: AtomicU32,
    alive: Arc<AtomicBool>,
}

/// Frames of one stream, as they arrive.
pub struct AgentStream {
    pub id: u32,
    pub rx: mpsc::UnboundedReceiver<Frame>,
    routes: Routes,
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.id);
        }
    }
}

impl AgentClient {
    /// Connects to the agent socket and completes the handshake, retrying until `timeout`
    /// (the guest may still be booting: the handshake is answered once its root is mounted).
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Arc<AgentClient>, HelloAck), AgentError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(_) => return Err(AgentError::Timeout(timeout)),
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let alive = Arc::new(AtomicBool::new(true));
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let (hello_tx, mut hello_rx) = mpsc::unbounded_channel::<HelloAck>();

        let alive_w = alive.clone();
        tokio::spawn(async move {
            while let Some(b) = out_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            alive_w.store(false, Ordering::SeqCst);
        });
        let (alive_r, routes_r) = (alive.clone(), routes.clone());
        tokio::spawn(async move {
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                while let Some(f) = dec.next_frame() {
                    if f.kind == Kind::Hello {
                        if let Ok(ack) = f.parse::<HelloAck>("hello") {
                            let _ = hello_tx.send(ack);
                        }
                        continue;
                    }
                    let tx = routes_r.lock().ok().and_then(|r| r.get(&f.stream).cloned());
                    if let Some(tx) = tx {
                        let _ = tx.send(f);
                    }
                }
            }
            alive_r.store(false, Ordering::SeqCst);
            // Dropping the senders ends every open stream.
            if let Ok(mut r) = routes_r.lock() {
                r.clear();
            }
        });

        let nonce: u64 = rand::random();
        let hello = Frame::json(
            Kind::Hello,
            0,
            &Hello {
                nonce,
                version: hutch_proto::VERSION,
            },
        );
        let hello = hello
            .encode()
            .map_err(|e| AgentError::Proto(e.to_string()))?;
        loop {
            if out.send(hello.clone()).is_err() {
                return Err(AgentError::Lost);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            match tokio::time::timeout(left.min(Duration::from_secs(2)), hello_rx.recv()).await {
                Ok(Some(ack)) if ack.nonce == nonce => {
                    // Stream ids start at a random point so frames of an earlier connection
                    // cannot be mistaken for ours.
                    let next = AtomicU32::new(rand::random::<u32>() | 1);
                    let client = AgentClient {
                        out,
                        routes,
                        next,
                        alive,
                    };
                    return Ok((Arc::new(client), ack));
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(AgentError::Lost),
                Err(_) => continue, // resend the hello
            }
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Opens a stream with `req`.
    pub fn open(&self, req: &Request) -> Result<AgentStream, AgentError> {
        if !self.is_alive() {
            return Err(AgentError::Lost);
        }
        let id = loop {
            let id = self.next.fetch_add(1, Ordering::SeqCst);
            if id != 0 {
                break id;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes
            .lock()
            .map_err(|_| AgentError::Lost)?
            .insert(id, tx);
        self.send(Frame::json(Kind::Request, id, req))?;
        Ok(AgentStream {
            id,
            rx,
            routes: self.routes.clone(),
        })
    }

    pub fn send(&self, frame: Frame) -> Result<(), AgentError> {
        let b = frame
            .encode()
            .map_err(|e| AgentError::Proto(e.to_string()))?;
        self.out.send(b).map_err(|_| AgentError::Lost)
    }

    /// Sends `data` as Stdin frames, then StdinEof.
    pub fn send_input(&self, stream: u32, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(64 * 1024) {
            self.send(Frame::new(Kind::Stdin, stream, chunk.to_vec()))?;
        }
        self.send(Frame::new(Kind::StdinEof, stream, Vec::new()))
    }
}
