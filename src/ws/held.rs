//! What WebSocket peers make the proxy hold, against `--ws-max-held`.
//!
//! tungstenite delivers a frame (or a fragmented message) only whole, so its bytes stay in
//! memory until it is complete and forwarded. [`Counted`], the stream under every
//! [`super::WsStream`], follows the frame boundaries of the bytes it reads (RFC 6455 §5.2: the
//! headers alone) and counts against [`HeldBytes`] the bytes of frames not complete yet, of
//! messages not finished yet and of messages not forwarded yet; each is given back exactly when
//! its message is delivered (control frames) or forwarded whole (data).
//!
//! At the limit a connection that holds bytes stops reading — except one: the first to wait
//! becomes the *finisher* and reads on until its message is forwarded, so the limit is passed
//! by at most one message (`--ws-max-frame`) and waiting connections can never wait on each
//! other for ever. A connection that holds nothing may always read once ([`super::READ_SIZE`]),
//! so small frames get through whatever the total. A waiting connection still sees its peer go.

use crate::transport::Stream;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The bytes held over all WebSocket connections, and their limit.
#[derive(Debug)]
pub struct HeldBytes {
    limit: usize,
    held: AtomicUsize,
    /// Times a connection stopped reading at the limit.
    pauses: AtomicU64,
    /// The connection allowed past the limit to finish its message (0: none).
    finisher: AtomicU64,
    next_id: AtomicU64,
    /// Connections waiting for the total to fall (or for the finisher's place), and a
    /// generation that tells a connection whether its waker is still listed.
    waiting: Mutex<(u64, Vec<Waker>)>,
}

impl HeldBytes {
    pub fn new(limit: usize) -> Arc<HeldBytes> {
        Arc::new(HeldBytes {
            limit,
            held: AtomicUsize::new(0),
            pauses: AtomicU64::new(0),
            finisher: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            waiting: Mutex::default(),
        })
    }

    /// Bytes held now, over all connections.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Times a connection stopped reading because the limit was reached.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.held.load(Ordering::Acquire) >= self.limit
    }

    /// Whether connection `id` may read past the limit: it is the finisher, or becomes it.
    fn may_finish(&self, id: u64) -> bool {
        let current = self.finisher.load(Ordering::Acquire);
        current == id
            || (current == 0
                && self.finisher.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    /// Connection `id` finished its message (or left): the finisher's place is free again.
    fn finished(&self, id: u64) {
        if self.finisher.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.wake_all();
        }
    }

    fn take(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives `n` bytes back, and wakes whoever waits once the total is under the limit.
    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.held.fetch_sub(n, Ordering::AcqRel);
        if before - n < self.limit {
            self.wake_all();
        }
    }

    fn wake_all(&self) {
        let woken = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.1.is_empty() {
                return;
            }
            waiting.0 += 1;
            std::mem::take(&mut waiting.1)
        };
        woken.into_iter().for_each(Waker::wake);
    }

    /// Lists the caller's waker unless it is listed already (same generation, same waker).
    /// Returns the generation it is listed under.
    fn wait(&self, waker: &Waker, listed: Option<u64>) -> u64 {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let generation = waiting.0;
        if listed != Some(generation) || !waiting.1.iter().any(|w| w.will_wake(waker)) {
            waiting.1.push(waker.clone());
        }
        generation
    }
}

/// Where the bytes read so far stand in the sequence of frames: enough of each header to know
/// its length, opcode and FIN bit (RFC 6455 §5.2), so that the bytes of complete frames are told
/// from those of the frame still coming.
#[derive(Debug, Default)]
struct Frames {
    /// The current frame's header bytes so far (at most 2 + 8 + 4).
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come, once its header is complete.
    payload_left: Option<u64>,
    /// Bytes of the current, incomplete frame read so far (header and payload).
    current: usize,
    /// Bytes of complete data frames of a message not finished yet (fragments).
    fragments: usize,
    /// Bytes of complete messages not delivered yet: data, and control frames.
    done_data: usize,
    done_control: usize,
}

impl Frames {
    /// The header's full length once its first two bytes are known.
    fn head_needed(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if self.head[1] & 0x80 != 0 { 4 } else { 0 }
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }

    /// Follows `data`, the next bytes read from the peer.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left.is_none() {
                let need = self.head_needed();
                let n = (need - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
                (self.head_len, self.current, data) = (self.head_len + n, self.current + n, &data[n..]);
                // The length is known from two bytes on; the header is whole at `need`.
                if self.head_len == self.head_needed() {
                    self.payload_left = Some(self.payload_len());
                }
            }
            if let Some(left) = self.payload_left {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                (self.current, data) = (self.current + n, &data[n..]);
                let left = left - n as u64;
                self.payload_left = Some(left);
                if left == 0 {
                    self.frame_done();
                }
            }
        }
    }

    fn frame_done(&mut self) {
        let (fin, control) = (self.head[0] & 0x80 != 0, self.head[0] & 0x08 != 0);
        let bytes = std::mem::take(&mut self.current);
        if control {
            self.done_control += bytes;
        } else if fin {
            self.done_data += std::mem::take(&mut self.fragments) + bytes;
        } else {
            self.fragments += bytes;
        }
        (self.head_len, self.payload_left) = (0, None);
    }

    /// Bytes of a frame or message the stream has not finished.
    fn unfinished(&self) -> usize {
        self.current + self.fragments
    }
}

/// The stream under a WebSocket: counts what is read from the peer against [`HeldBytes`] until
/// [`super::WsStream`] gives it back, and stops reading at the limit. Uncounted before the
/// handshake is over.
pub(super) struct Counted {
    pub(super) inner: Stream,
    held: Option<Arc<HeldBytes>>,
    pub(super) armed: bool,
    id: u64,
    frames: Frames,
    /// Bytes this connection holds against the limit.
    counted: usize,
    /// The waiting-list generation this connection is listed under, while it waits.
    listed: Option<u64>,
    /// While it waits: done when the peer has closed its sending side (see [`peer_gone`]).
    gone: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The peer closed while this connection waited: what it sent is all there will be (no
    /// more than its socket buffer), so it is read whatever the limit says.
    peer_closed: bool,
}

impl Counted {
    pub(super) fn new(inner: Stream, held: Option<Arc<HeldBytes>>) -> Counted {
        let id = held.as_ref().map_or(0, |h| h.next_id.fetch_add(1, Ordering::Relaxed));
        Counted {
            inner,
            held,
            armed: false,
            id,
            frames: Frames::default(),
            counted: 0,
            listed: None,
            gone: None,
            peer_closed: false,
        }
    }

    fn give_back(&mut self, n: usize) {
        let n = n.min(self.counted);
        self.counted -= n;
        if let Some(held) = &self.held {
            held.give_back(n);
        }
    }

    /// A data message was delivered: what it took is handed over (the caller gives it back once
    /// the message is forwarded, [`Counted::forwarded`]).
    pub(super) fn take_message(&mut self) -> usize {
        std::mem::take(&mut self.frames.done_data)
    }

    /// A message taken with [`Counted::take_message`] was forwarded whole.
    pub(super) fn forwarded(&mut self, bytes: usize) {
        self.give_back(bytes);
        if let Some(held) = &self.held {
            held.finished(self.id);
        }
    }

    /// A control frame was delivered: the control frames read so far are held no longer (and a
    /// finisher in the middle of no message makes way).
    pub(super) fn control_delivered(&mut self) {
        let bytes = std::mem::take(&mut self.frames.done_control);
        self.give_back(bytes);
        if self.frames.unfinished() == 0
            && let Some(held) = &self.held
        {
            held.finished(self.id);
        }
    }

    /// The stream ended: returns how much of an unfinished frame or message it cut short, and
    /// gives everything back.
    pub(super) fn ended(&mut self) -> usize {
        let cut = self.frames.unfinished();
        self.give_back(self.counted);
        cut
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.give_back(self.counted);
        if let Some(held) = &self.held {
            held.finished(self.id);
        }
    }
}

/// Done once the peer of `tcp` has closed its sending side (FIN or RST), whether or not unread
/// bytes remain: a connection that waits to read must still see its peer go, or it would hold
/// its bytes (and its place) for ever. (A FIN sent behind bytes the peer could not send yet
/// waits, as TCP's flow control has it, until the window opens; a reset arrives at once.)
/// It watches a duplicate of the socket for `EPOLLRDHUP`, so only waiting connections pay for
/// it. `None` if the socket cannot be watched (out of descriptors): the connection then waits
/// for the total to fall, as it would without the watch.
fn peer_gone(tcp: &tokio::net::TcpStream) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    use std::os::fd::AsFd;
    use tokio::io::unix::AsyncFd;
    // Deprecated because a borrowed descriptor could be closed under it; an `OwnedFd` (a
    // duplicate that shares the socket, closed alone on drop) cannot be.
    #[allow(deprecated)]
    let watch = tcp
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| AsyncFd::with_interest(fd, tokio::io::Interest::READABLE));
    let watch = match watch {
        Ok(watch) => watch,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch a waiting WebSocket connection for its peer's close");
            return None;
        }
    };
    Some(Box::pin(async move {
        loop {
            let Ok(mut ready) = watch.readable().await else { return };
            if ready.ready().is_read_closed() {
                return;
            }
            // Only more bytes: forget this readiness and wait for the next change.
            ready.clear_ready();
        }
    }))
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(held) = this.held.as_ref().filter(|_| this.armed) else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        // Only a connection in the middle of a message may become the finisher: reading on is
        // what completes it.
        let finishing = |this: &Counted| this.frames.unfinished() > 0 && held.may_finish(this.id);
        if this.counted > 0 && !this.peer_closed && held.full() && !finishing(this) {
            let first = this.listed.is_none();
            this.listed = Some(held.wait(cx.waker(), this.listed));
            // Checked again once listed: a change in between would not wake us.
            if held.full() && !finishing(this) {
                if first {
                    held.pauses.fetch_add(1, Ordering::Relaxed);
                }
                if this.gone.is_none() {
                    this.gone = peer_gone(this.inner.tcp());
                }
                match this.gone.as_mut().map(|gone| gone.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => this.peer_closed = true,
                    _ => return Poll::Pending,
                }
            }
        }
        this.listed = None;
        this.gone = None;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        this.frames.feed(read);
        this.counted += read.len();
        held.take(read.len());
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, masked: bool, payload: usize) -> Vec<u8> {
        let mut f = vec![first];
        let mask = if masked { 0x80 } else { 0 };
        match payload {
            0..=125 => f.push(mask | payload as u8),
            126..=65535 => {
                f.push(mask | 126);
                f.extend((payload as u16).to_be_bytes());
            }
            _ => {
                f.push(mask | 127);
                f.extend((payload as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend([1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x55, payload));
        f
    }

    #[test]
    fn frame_boundaries_are_followed_however_the_bytes_are_cut() {
        // A binary message in two fragments, a ping between them, a close; masked and not,
        // every header length, a ping with a 64-bit length (legal, if not minimal).
        for masked in [false, true] {
            let fragment = frame(0x02, masked, 70_000); // binary, FIN clear
            let ping = {
                let mut p = vec![0x89, if masked { 0x80 | 127 } else { 127 }];
                p.extend(5u64.to_be_bytes());
                if masked {
                    p.extend([9, 9, 9, 9]);
                }
                p.extend([0; 5]);
                p
            };
            let last = frame(0x80, masked, 300); // continuation, FIN set
            let close = frame(0x88, masked, 2);
            let stream = [&fragment[..], &ping, &last, &close].concat();
            for step in [1, 7, 1000, stream.len()] {
                let mut f = Frames::default();
                for chunk in stream.chunks(step) {
                    f.feed(chunk);
                }
                assert_eq!(f.unfinished(), 0, "step {step}");
                assert_eq!(f.done_data, fragment.len() + last.len(), "step {step}");
                assert_eq!(f.done_control, ping.len() + close.len(), "step {step}");
                // Halfway through the first fragment, its bytes are unfinished.
                let mut half = Frames::default();
                half.feed(&fragment[..fragment.len() / 2]);
                assert_eq!(half.unfinished(), fragment.len() / 2);
                assert_eq!((half.done_data, half.done_control), (0, 0));
            }
        }
    }

    #[test]
    fn the_first_to_wait_finishes_and_frees_its_place_when_its_message_is_forwarded() {
        let held = HeldBytes::new(100);
        held.take(150);
        assert!(held.full());
        assert!(held.may_finish(1), "the first to ask is let through");
        assert!(held.may_finish(1), "and stays the finisher");
        assert!(!held.may_finish(2), "one finisher at a time");
        held.finished(2);
        assert!(!held.may_finish(2), "only the finisher frees its place");
        held.finished(1);
        assert!(held.may_finish(2));
        held.give_back(150);
        assert_eq!(held.held(), 0);
    }
}
