//! A fault-injecting TCP proxy, put between a drone and the queen to model what a `kill`
//! cannot: a slow link, a dropped or reset connection, a partition.
//!
//! The proxy listens on `127.0.0.1:0` and relays every accepted connection to the queen's
//! drone port. Its [`Fault`] is switched at run time ([`Proxy::set`]) and applies at once to
//! every connection, open or new. It runs on its own small tokio runtime, so tests stay
//! plain blocking code; dropping the proxy closes everything it holds.
//!
//! A [`Fault::Blackhole`] does not read: bytes sent into it wait in the kernel's buffers,
//! as packets wait in retransmission during a partition, and flow again when the fault is
//! lifted — unless an end gave up on the connection meanwhile, which the other end then
//! learns (an end of stream or a reset), just as after a real partition heals.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the proxy does to the bytes and connections passing through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relays both ways untouched.
    Pass,
    /// Holds every chunk this long before passing it on, both ways (latency, not loss).
    Delay(Duration),
    /// Closes every connection (an end of stream to both ends) and each new one at once.
    Drop,
    /// Keeps connections open but passes nothing either way; new connections are
    /// accepted and connected upstream, then hear nothing. A partition.
    Blackhole,
    /// Resets every connection (`SO_LINGER` 0, then close: an RST to both ends) and each
    /// new one at once.
    Reset,
}

/// Most bytes queued in one direction of one connection before the proxy stops reading
/// it: a delayed link must not buffer without bound.
const MAX_QUEUED: usize = 1 << 20;

/// Size of one read.
const CHUNK: usize = 64 * 1024;

/// After a failed `accept` (e.g. out of descriptors), how long to wait before the next,
/// so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A running proxy. See the module docs.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Connections accepted so far, to tell a drone that reconnected from one that did not.
    accepted: Arc<AtomicU64>,
    /// Owns the accept loop and every relay; `Option` only so `Drop` can shut it down
    /// without waiting for tasks that hold connections open on purpose.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy in [`Fault::Pass`] relaying to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hive-test-proxy")
            .enable_all()
            .build()
            .expect("build the proxy's runtime");
        let listener = runtime
            .block_on(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the proxy's address");
        let (fault, rx) = watch::channel(Fault::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        runtime.spawn(accept_loop(listener, upstream, rx, accepted.clone()));
        Proxy {
            addr,
            upstream,
            fault,
            accepted,
            runtime: Some(runtime),
        }
    }

    /// Where drones connect instead of the queen.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The queen's address the proxy relays to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the fault; open connections and new ones follow it at once.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// How many connections the proxy has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: watch::Receiver<Fault>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let down = match listener.accept().await {
            Ok((down, _)) => down,
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let fault = fault.clone();
        tokio::spawn(async move {
            let now_fault = *fault.borrow();
            match now_fault {
                Fault::Drop => return,
                Fault::Reset => return reset(&down),
                Fault::Pass | Fault::Delay(_) | Fault::Blackhole => {}
            }
            let up = match TcpStream::connect(upstream).await {
                Ok(up) => up,
                // The queen is down: the drone sees its connection refused, as it would.
                Err(_) => return reset(&down),
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            relay(down, up, fault).await;
        });
    }
}

/// Makes dropping `s` send an RST instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// One direction of a relayed connection: bytes read from one end, each chunk with the
/// instant it may be written to the other.
#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes of the front chunk already written.
    offset: usize,
    queued: usize,
    /// The source end closed its side.
    eof: bool,
    /// The end of stream was passed on (`shutdown(Write)` on the target).
    shut: bool,
}

impl Lane {
    fn wants_read(&self) -> bool {
        !self.eof && self.queued < MAX_QUEUED
    }

    /// When the front chunk may be written, if there is one.
    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    fn due(&self, now: Instant) -> bool {
        self.next_due().is_some_and(|due| due <= now)
    }

    /// Whether the end of stream is read and everything before it written.
    fn ready_to_shut(&self) -> bool {
        self.eof && self.queue.is_empty() && !self.shut
    }

    fn done(&self) -> bool {
        self.shut
    }

    /// One non-blocking read from `from`; an error means the connection is broken.
    fn read_from(&mut self, from: &TcpStream, buf: &mut [u8], delay: Duration) -> io::Result<()> {
        match from.try_read(buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.queue
                    .push_back((Instant::now() + delay, buf[..n].to_vec()));
                self.queued += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// One non-blocking write of the front chunk to `to`.
    fn write_to(&mut self, to: &TcpStream) -> io::Result<()> {
        let Some((_, chunk)) = self.queue.front() else {
            return Ok(());
        };
        match to.try_write(&chunk[self.offset..]) {
            Ok(n) => {
                self.offset += n;
                if self.offset == chunk.len() {
                    self.queued -= chunk.len();
                    self.offset = 0;
                    self.queue.pop_front();
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Relays `down` (the drone) ⇄ `up` (the queen) until both directions ended, a side broke
/// the connection, or the fault says to drop or reset it. One task owns both sockets, so a
/// fault switch reaches both directions at the same instant.
async fn relay(mut down: TcpStream, mut up: TcpStream, mut fault: watch::Receiver<Fault>) {
    let mut to_up = Lane::default();
    let mut to_down = Lane::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let now_fault = *fault.borrow_and_update();
        let delay = match now_fault {
            Fault::Drop => return,
            Fault::Reset => {
                reset(&down);
                reset(&up);
                return;
            }
            Fault::Blackhole => {
                if fault.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Pass => Duration::ZERO,
            Fault::Delay(d) => d,
        };
        if to_up.ready_to_shut() {
            let _ = up.shutdown().await;
            to_up.shut = true;
        }
        if to_down.ready_to_shut() {
            let _ = down.shutdown().await;
            to_down.shut = true;
        }
        if to_up.done() && to_down.done() {
            return;
        }
        let now = Instant::now();
        // The earliest chunk still held back by a delay, to wake up for it.
        let held_back = [to_up.next_due(), to_down.next_due()]
            .into_iter()
            .flatten()
            .filter(|due| *due > now)
            .min();
        // Biased, fault first: a fault switched before bytes arrived applies to those bytes
        // (with a random pick they could slip through under the old fault).
        let result: io::Result<()> = tokio::select! {
            biased;
            changed = fault.changed() => match changed {
                Ok(()) => Ok(()),
                Err(_) => return,
            },
            r = down.readable(), if to_up.wants_read() => {
                r.and_then(|()| to_up.read_from(&down, &mut buf, delay))
            }
            r = up.readable(), if to_down.wants_read() => {
                r.and_then(|()| to_down.read_from(&up, &mut buf, delay))
            }
            r = up.writable(), if to_up.due(now) => r.and_then(|()| to_up.write_to(&up)),
            r = down.writable(), if to_down.due(now) => r.and_then(|()| to_down.write_to(&down)),
            () = sleep_until_opt(held_back), if held_back.is_some() => Ok(()),
        };
        if result.is_err() {
            // One end broke the connection: the other learns it the same way.
            reset(&down);
            reset(&up);
            return;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};

    /// An upstream that echoes every byte back, one thread per connection.
    fn echo_server() -> SocketAddr {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(proxy: &Proxy) -> StdStream {
        let s = StdStream::connect(proxy.addr()).expect("connect to the proxy");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s
    }

    fn roundtrip(s: &mut StdStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn pass_relays_and_delay_holds_bytes_back() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(roundtrip(&mut s, b"hello").expect("echo"), b"hello");
        proxy.set(Fault::Delay(Duration::from_millis(150)));
        let started = std::time::Instant::now();
        assert_eq!(roundtrip(&mut s, b"slow").expect("echo"), b"slow");
        // Held once each way.
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(proxy.accepted(), 1);
    }

    #[test]
    fn blackhole_passes_nothing_until_lifted_then_delivers() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(roundtrip(&mut s, b"a").expect("echo"), b"a");
        proxy.set(Fault::Blackhole);
        s.write_all(b"held").expect("a blackhole accepts writes");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("read timeout");
        let mut buf = [0u8; 4];
        let err = s.read(&mut buf).expect_err("nothing comes back");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        proxy.set(Fault::Pass);
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s.read_exact(&mut buf).expect("delivered once lifted");
        assert_eq!(&buf, b"held");
    }

    #[test]
    fn drop_closes_and_reset_resets_open_and_new_connections() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(roundtrip(&mut s, b"a").expect("echo"), b"a");
        proxy.set(Fault::Drop);
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).expect("a clean end of stream"), 0);
        let mut new = connect(&proxy);
        assert_eq!(new.read(&mut buf).expect("closed on accept"), 0);

        proxy.set(Fault::Pass);
        let mut s = connect(&proxy);
        assert_eq!(roundtrip(&mut s, b"b").expect("echo"), b"b");
        proxy.set(Fault::Reset);
        let err = s.read(&mut buf).expect_err("a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let mut new = connect(&proxy);
        let err = new.read(&mut buf).expect_err("reset on accept");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let _ = new.shutdown(Shutdown::Both);
    }
}
