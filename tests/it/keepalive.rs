//! Keep Alive measured against a real mosquitto: who closed, and after how much silence.

use crate::harness::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_silent_client_is_closed_by_mosquitto_and_the_record_shows_the_silence() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut client = proxy.connect().await;
    client.write_all(&connect_v4("sleepy", 2, None)).await.unwrap();
    expect_packet(&mut client, Duration::from_secs(5), "CONNACK").await;

    // Say nothing more. mosquitto 2.0 checks every ~6 s in whole seconds (KEEPALIVE.md):
    // it closes a Keep Alive 2 client somewhere between ~3 s and ~10 s after its last packet.
    let (_, ending) = read_to_end(&mut client, Duration::from_secs(14)).await;
    assert_eq!(ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    drop(client); // a real client closes on EOF; the record is complete once both sides closed
    let (conn, close) = proxy.next_closed(Duration::from_secs(2)).await;
    assert_eq!(conn.client_id().as_deref(), Some("sleepy"));
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("broker", "fin"));
    assert_eq!(close.keep_alive_enforced, Some(2));
    let silence = close.silence_s.unwrap();
    assert!((2.9..=10.5).contains(&silence), "silence {silence} s outside mosquitto's window");
    let ratio = close.silence_ratio.unwrap();
    assert!((ratio - silence / 2.0).abs() < 1e-9, "ratio {ratio} is silence / Keep Alive");
    assert!(broker.log().contains("sleepy has exceeded timeout"), "mosquitto log:\n{}", broker.log());
}
