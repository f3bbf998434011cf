//! The fake drone against a minimal queen played by the test: what it counts as seen, what
//! its own heartbeats hold, and what raw bytes and closes look like. The queen's and the
//! cross-process tests rely on exactly these behaviours.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hive_testkit::blocking;
use hive_testkit::drone::{hello, Heartbeats, Incoming};
use hive_testkit::FakeDrone;
use shared::frame;
use shared::protocol::{Assign, DroneMessage, Heartbeat, QueenMessage, Welcome};
use shared::{DroneId, Fence, TaskId};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

type Link = Framed<TcpStream, LengthDelimitedCodec>;

async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

async fn accept(l: &TcpListener) -> Link {
    let (s, _) = l.accept().await.expect("accept");
    Framed::new(s, frame::codec(frame::DEFAULT_MAX_FRAME_LEN))
}

async fn send(link: &mut Link, m: QueenMessage) {
    link.send(frame::encode(&m).expect("encode"))
        .await
        .expect("send");
}

async fn next(link: &mut Link) -> DroneMessage {
    let f = tokio::time::timeout(Duration::from_secs(10), link.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("frame");
    frame::decode(&f).expect("a drone message")
}

async fn welcome(link: &mut Link, interval_ms: u64) {
    assert!(matches!(next(link).await, DroneMessage::Hello(_)));
    send(
        link,
        QueenMessage::Welcome(Welcome {
            protocol_version: 1,
            heartbeat_interval_ms: interval_ms,
            heartbeat_timeout_ms: 10 * interval_ms,
            epoch: None,
            pongs: None,
            encoding: None,
        }),
    )
    .await;
}

fn assign(n: u64) -> Assign {
    Assign {
        task_id: TaskId::generate(),
        fence: Fence(n),
        attempt: 1,
        kind: "echo".into(),
        queue: "default".into(),
        payload: serde_json::Value::Null,
        timeout_ms: None,
        checkpoint: None,
    }
}

async fn heartbeat(link: &mut Link) -> Heartbeat {
    loop {
        if let DroneMessage::Heartbeat(h) = next(link).await {
            return h;
        }
    }
}

/// Guards the scripted drone's promise: an assign counts as seen only once the test has
/// received it, so a heartbeat never admits to an assign the test has not read.
#[tokio::test]
async fn a_scripted_drone_counts_an_assign_once_the_test_received_it() {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    let queen = tokio::spawn(async move {
        let mut link = accept(&l).await;
        welcome(&mut link, 60_000).await;
        send(&mut link, QueenMessage::Assign(assign(1))).await;
        let before = heartbeat(&mut link).await;
        let after = heartbeat(&mut link).await;
        (before.assigns_seen, after.assigns_seen)
    });
    let mut d = FakeDrone::connect(addr, hello(DroneId::generate(), 1, vec![])).await;
    d.heartbeat(vec![]).await;
    let a = d.expect_assign().await;
    assert_eq!(a.fence, Fence(1));
    d.heartbeat(vec![]).await;
    assert_eq!(queen.await.expect("join"), (0, 1));
}

/// Guards the live drone: it heartbeats on its own, holding what it was assigned, until
/// the test releases the task or silences it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_drone_heartbeats_what_it_holds_on_its_own() {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut link = accept(&l).await;
        welcome(&mut link, 20).await;
        send(&mut link, QueenMessage::Assign(assign(7))).await;
        while let Some(Ok(f)) = link.next().await {
            if let Ok(DroneMessage::Heartbeat(h)) = frame::decode::<DroneMessage>(&f) {
                let _ = tx.send(h);
            }
        }
    });
    let d = FakeDrone::connect_with(
        addr,
        hello(DroneId::generate(), 1, vec![]),
        Heartbeats::Automatic,
    )
    .await;
    let held = loop {
        let h = rx.recv().await.expect("a heartbeat");
        if h.assigns_seen == 1 {
            break h.held;
        }
    };
    assert_eq!(held.iter().map(|h| h.fence).collect::<Vec<_>>(), [Fence(7)]);
    d.release(held[0].task_id);
    loop {
        let h = rx.recv().await.expect("a heartbeat");
        if h.held.is_empty() {
            assert_eq!(h.assigns_seen, 1);
            break;
        }
    }
    d.go_silent();
    // Drain what was sent before the silence, then expect nothing more.
    while tokio::time::timeout(Duration::from_millis(100), rx.recv())
        .await
        .is_ok()
    {}
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "a silent drone still heartbeats"
    );
}

/// Guards the raw face: bytes go out as they are, and a read until the close returns
/// every frame before it as JSON.
#[test]
fn a_raw_connection_sends_bytes_verbatim_and_reads_until_the_close() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let l = rt.block_on(listen());
    let addr = l.local_addr().expect("addr");
    let queen = rt.spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut got)
            .await
            .expect("read");
        let mut link = Framed::new(s, frame::codec(frame::DEFAULT_MAX_FRAME_LEN));
        send(
            &mut link,
            QueenMessage::Error {
                message: "bad".into(),
            },
        )
        .await;
        got
    });
    let d = blocking::FakeDrone::open(addr);
    d.send_bytes(b"\x00\x00\x00\x01{").expect("send");
    let closing = d.read_until_closed(Duration::from_secs(10));
    assert_eq!(closing.frames.len(), 1, "{closing:?}");
    assert_eq!(closing.frames[0]["type"], "error");
    assert_eq!(closing.frames[0]["message"], "bad");
    assert_eq!(&rt.block_on(queen).expect("join"), b"\x00\x00\x00\x01{");
    assert!(matches!(
        d.recv(Duration::from_millis(10)),
        Some(Incoming::Closed(_))
    ));
}
