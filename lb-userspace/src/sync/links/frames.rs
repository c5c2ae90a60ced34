//! Frames on the two halves of a TCP connection: [`wire::framing`] by hand, on
//! `read_buf` and `write_all`, so that reading is cancel-safe (a timeout around
//! [`FrameReader::next`] loses no byte) and a batch of frames leaves in one write.

use std::io;

use bytes::{Bytes, BytesMut};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};
use tracing::debug;

use crate::sync::wire;

/// The bytes the length field adds to each frame.
pub(super) const LENGTH_FIELD: u64 = 4;
/// DSCP CS6 (network control) in the TOS byte, as VRRP adverts carry: sync traffic
/// decides whether a takeover breaks connections, so it goes before bulk data.
const TOS_CS6: u32 = 0xc0;

/// Why no frame came.
#[derive(Debug)]
pub(super) enum ReadError {
    /// A length field above [`wire::MAX_FRAME`]: framing can no longer be trusted.
    TooLong,
    /// The socket failed, or it closed in the middle of a frame.
    Io(io::Error),
}

/// The read half, with what has arrived of the next frame.
pub(super) struct FrameReader {
    io: OwnedReadHalf,
    codec: LengthDelimitedCodec,
    buf: BytesMut,
}

/// The write half, with the frames pushed but not yet written.
pub(super) struct FrameWriter {
    io: OwnedWriteHalf,
    codec: LengthDelimitedCodec,
    buf: BytesMut,
}

/// Sets `TCP_NODELAY` (a frame is a message: waiting for more to fill a segment
/// would add the lag flow sync exists to avoid) and DSCP CS6 (best effort: a
/// failure is logged and the connection kept).
pub(super) fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let tos = if stream.local_addr()?.is_ipv4() {
        sock.set_tos_v4(TOS_CS6)
    } else {
        sock.set_tclass_v6(TOS_CS6)
    };
    if let Err(error) = tos {
        debug!(%error, "sync: cannot set DSCP CS6 on a peer connection");
    }
    Ok(())
}

/// The connection's halves, each framed.
pub(super) fn split(stream: TcpStream) -> (FrameReader, FrameWriter) {
    let (rd, wr) = stream.into_split();
    (
        FrameReader {
            io: rd,
            codec: wire::framing(),
            buf: BytesMut::with_capacity(wire::MAX_FRAME),
        },
        FrameWriter {
            io: wr,
            codec: wire::framing(),
            buf: BytesMut::with_capacity(wire::MAX_FRAME),
        },
    )
}

impl FrameReader {
    /// The next frame (without its length field), or `None` at a clean end of
    /// stream. Cancel-safe.
    pub(super) async fn next(&mut self) -> Result<Option<BytesMut>, ReadError> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                // The codec's only error: a length above its maximum.
                Err(_) => return Err(ReadError::TooLong),
            }
            if self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(ReadError::Io)?
                == 0
            {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }
}

impl FrameWriter {
    /// Appends `frame` with its length field; returns the bytes it takes on the
    /// wire. Nothing is sent before [`FrameWriter::flush`].
    pub(super) fn push(&mut self, frame: Bytes) -> u64 {
        let len = frame.len() as u64 + LENGTH_FIELD;
        // Sealed frames are at most wire::MAX_FRAME long, the codec's limit.
        let encoded = self.codec.encode(frame, &mut self.buf);
        debug_assert!(encoded.is_ok(), "a sealed frame above the frame limit");
        len
    }

    /// Writes every pushed frame.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        let written = self.io.write_all(&self.buf).await;
        self.buf.clear();
        written
    }

    /// Writes `bytes` as they are: a test's broken frame.
    #[cfg(test)]
    pub(super) async fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    /// Writes every pushed frame and then the end of stream (FIN): the peer reads
    /// all of it and then sees the connection close.
    pub(super) async fn finish(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}
