//! Codec micro-benchmarks: frames per second through the splitter, and CONNECT/CONNACK
//! inspection (decode, and the Server Keep Alive re-encode). `cargo bench --bench codec`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mqtt_chaos::codec::{
    Connack, Connect, FrameHeader, Protocol, Splitter, Step, connack_with_server_keep_alive,
};
use std::hint::black_box;

/// A realistic mix: 1 KiB PUBLISH, PUBACK, PINGREQ, 16 B PUBLISH, repeated to ~1 MiB.
fn stream() -> (Vec<u8>, u64) {
    let mut one = Vec::new();
    let mut publish = vec![0x30, 0x88, 0x08, 0, 5, b't', b'o', b'p', b'i', b'c'];
    publish.extend([0x42; 1025]);
    one.extend(&publish);
    one.extend([0x40, 0x02, 0x00, 0x01]);
    one.extend([0xc0, 0x00]);
    one.extend([0x30, 0x17, 0, 5, b't', b'o', b'p', b'i', b'c']);
    one.extend([0x11; 16]);
    let copies = (1 << 20) / one.len();
    (one.repeat(copies), 4 * copies as u64)
}

fn splitter(c: &mut Criterion) {
    let (bytes, frames) = stream();
    let mut group = c.benchmark_group("splitter");
    group.throughput(Throughput::Elements(frames));
    group.bench_function("frames", |b| {
        b.iter(|| {
            let mut s = Splitter::new(256 * 1024);
            let mut rest = black_box(&bytes[..]);
            let mut n = 0u64;
            while let Step::Frame(h) = s.step(rest) {
                rest = &rest[h.frame_len()..];
                n += 1;
            }
            n
        })
    });
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("bytes", |b| {
        b.iter(|| {
            let mut s = Splitter::new(256 * 1024);
            let mut rest = black_box(&bytes[..]);
            while let Step::Frame(h) = s.step(rest) {
                rest = &rest[h.frame_len()..];
            }
        })
    });
    group.finish();
}

fn inspection(c: &mut Criterion) {
    // MQTT 5 CONNECT with properties, a Will with properties, username and password.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xce, 0, 60, 8, 0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 20];
    body.extend([0, 9, b's', b'e', b'n', b's', b'o', b'r', b'-', b'4', b'2']);
    body.extend([5, 0x18, 0, 0, 0, 30, 0, 12]);
    body.extend(b"status/s-42");
    body.push(b'!');
    body.extend([0, 7]);
    body.extend(b"offline");
    body.extend([0, 4, b'u', b's', b'e', b'r', 0, 4, b'p', b'a', b's', b's']);
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(&body);
    let ch = FrameHeader::parse(&connect).unwrap().unwrap();
    assert!(Connect::decode(&connect, &ch).is_ok());
    let connack = [0x20, 0x0b, 0x00, 0x00, 0x08, 0x21, 0, 10, 0x13, 0, 20, 0x25, 0];
    let ah = FrameHeader::parse(&connack).unwrap().unwrap();
    assert!(Connack::decode(&connack, &ah, Protocol::V5).is_ok());

    let mut group = c.benchmark_group("inspection");
    group.throughput(Throughput::Elements(1));
    group.bench_function("connect_v5_decode", |b| b.iter(|| Connect::decode(black_box(&connect), &ch)));
    group.bench_function("connack_v5_decode", |b| {
        b.iter(|| Connack::decode(black_box(&connack), &ah, Protocol::V5))
    });
    group.bench_function("connack_v5_set_server_keep_alive", |b| {
        b.iter(|| connack_with_server_keep_alive(black_box(&connack), &ah, 5))
    });
    group.finish();
}

criterion_group!(benches, splitter, inspection);
criterion_main!(benches);
