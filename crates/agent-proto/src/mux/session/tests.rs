use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::mux::{read_port, write_port, ACCEPTED, REFUSED};

/// A guest handler: port 7 echoes, anything else is refused.
fn echo(mut s: MuxStream) {
    tokio::spawn(async move {
        let port = read_port(&mut s).await.unwrap();
        if port != 7 {
            let _ = s.write_all(&[REFUSED]).await;
            return;
        }
        s.write_all(&[ACCEPTED]).await.unwrap();
        let (mut r, mut w) = tokio::io::split(s);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
}

async fn open(opener: &Opener, port: u32) -> (MuxStream, OwnedSemaphorePermit, u8) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match opener.open().await {
            Ok((mut s, p)) => {
                write_port(&mut s, port).await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                return (s, p, b[0]);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), io::ErrorKind::NotConnected);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("no session: {e}"),
        }
    }
}

async fn round_trip(opener: &Opener, data: &[u8]) -> Vec<u8> {
    let (s, _permit, ack) = open(opener, 7).await;
    assert_eq!(ack, ACCEPTED);
    let (mut r, mut w) = tokio::io::split(s);
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test]
async fn streams_cross_the_link_and_ports_are_checked() {
    let (host_end, guest_end) = tokio::io::duplex(4096);
    let (g_rd, g_wr) = tokio::io::split(guest_end);
    let (h_rd, h_wr) = tokio::io::split(host_end);
    let guest = tokio::spawn(async move {
        let mut g_rd = g_rd;
        guest_link(&mut g_rd, g_wr, echo).await
    });
    let opener = Opener::default();
    let host = tokio::spawn(host_link(h_rd, h_wr, opener.clone()));

    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (a, b) = tokio::join!(round_trip(&opener, &big), round_trip(&opener, b"hello"));
    assert!(a == big, "a 3 MB stream comes back intact");
    assert_eq!(b, b"hello");
    let (_s, _p, ack) = open(&opener, 8).await;
    assert_eq!(ack, REFUSED);
    host.abort();
    // The host side went away: the guest's link ends (EOF), ready for the next host.
    assert!(tokio::time::timeout(Duration::from_secs(5), guest)
        .await
        .is_ok());
}

/// What a snapshot restore looks like to the guest: the old host's bytes stop mid-frame, a new
/// host starts talking; and the new host first reads what the guest sent the old one.
#[tokio::test]
async fn a_new_host_gets_a_fresh_session_past_torn_and_stale_frames() {
    let (mut h2g_w, h2g_r) = tokio::io::duplex(1 << 20);
    let (g2h_w, g2h_r) = tokio::io::duplex(1 << 20);
    // The old session's tail: half a data frame to the guest, stale frames to the host.
    let torn = encode(&Frame::Data(vec![1; 3000]));
    h2g_w.write_all(&torn[..1700]).await.unwrap();
    let mut stale_w = g2h_w;
    stale_w
        .write_all(&encode(&Frame::HelloAck(12345)))
        .await
        .unwrap();
    stale_w
        .write_all(&encode(&Frame::Data(vec![
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        ])))
        .await
        .unwrap();
    let guest = tokio::spawn(async move {
        let mut r = h2g_r;
        guest_link(&mut r, stale_w, echo).await
    });
    let opener = Opener::default();
    let host = tokio::spawn(host_link(g2h_r, h2g_w, opener.clone()));
    assert_eq!(
        round_trip(&opener, b"after restore").await,
        b"after restore"
    );
    host.abort();
    guest.abort();
}

/// A hostile guest: megabytes without a frame boundary, corrupt frames, a flood of `Reset`s and
/// acks for nonces it guessed. The host stays bounded, opens nothing meanwhile, and serves a
/// well-behaved agent that comes after.
#[tokio::test]
async fn a_hostile_guest_cannot_wedge_the_host() {
    // Room for every Hello the host answers the Resets with (nobody reads them yet).
    let (h2g_w, mut h2g_r) = tokio::io::duplex(1 << 20);
    let (mut g2h_w, g2h_r) = tokio::io::duplex(1 << 16);
    let opener = Opener::default();
    let host = tokio::spawn(host_link(g2h_r, h2g_w, opener.clone()));
    g2h_w.write_all(&vec![0x41; 8 << 20]).await.unwrap();
    let mut bad = encode(&Frame::Data(vec![9; 100]));
    bad[10] ^= 1;
    for i in 0..2000u64 {
        g2h_w.write_all(&bad).await.unwrap();
        g2h_w.write_all(&encode(&Frame::Reset)).await.unwrap();
        g2h_w.write_all(&encode(&Frame::HelloAck(i))).await.unwrap();
    }
    assert!(!opener.connected(), "no session from guessed acks");
    // Now a real agent on the same port.
    let guest = tokio::spawn(async move { guest_link(&mut h2g_r, g2h_w, echo).await });
    assert_eq!(round_trip(&opener, b"still works").await, b"still works");
    host.abort();
    guest.abort();
}
