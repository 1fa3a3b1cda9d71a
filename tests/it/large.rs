//! A 20 MiB PUBLISH through the proxy binary, with its memory measured from /proc.

use crate::harness::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const SIZE: usize = 20 * 1024 * 1024;

#[tokio::test]
async fn a_20_mib_publish_passes_with_proxy_memory_far_below_its_size() {
    let broker = Mosquitto::start();
    let proxy = ProxyProcess::start(&broker.addr(), &[]);
    let pid = proxy.pid();
    let connect = || proxy.connect();

    // The subscriber is behind the proxy too, so the payload crosses it twice.
    let mut sub = connect().await;
    sub.write_all(&connect_v4("big-sub", 60, None)).await.unwrap();
    expect_packet(&mut sub, Duration::from_secs(5), "CONNACK").await;
    sub.write_all(&subscribe_v4(1, "big/#", 0)).await.unwrap();
    expect_packet(&mut sub, Duration::from_secs(5), "SUBACK").await;
    let baseline = peak_rss(pid);

    let payload: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 256) as u8).collect();
    let publish = publish_v4("big/blob", &payload);
    let mut publ = connect().await;
    publ.write_all(&connect_v4("big-pub", 60, None)).await.unwrap();
    expect_packet(&mut publ, Duration::from_secs(5), "CONNACK").await;
    let writer = tokio::spawn(async move {
        publ.write_all(&publish).await.unwrap();
        publ
    });
    let received = tokio::time::timeout(Duration::from_secs(30), read_packet(&mut sub))
        .await
        .expect("the 20 MiB PUBLISH did not arrive within 30 s")
        .unwrap();
    let _publ = writer.await.unwrap();
    assert_eq!(received.len(), publish_v4("big/blob", &payload).len());
    assert!(received.ends_with(&payload), "payload corrupted");

    let peak = peak_rss(pid);
    drop(proxy);
    assert!(
        peak < baseline + 4 * 1024 * 1024,
        "proxy peak RSS grew from {baseline} to {peak} bytes while relaying {SIZE} bytes twice"
    );
}
