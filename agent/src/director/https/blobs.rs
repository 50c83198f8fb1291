//! The agent's local blobstore as the HTTPS API serves it: `<base>/data/blobs/<id>`, the
//! directory upstream's API uses and the one the `local` provider reads for create-env's
//! `/var/vcap/micro_bosh/data/cache`. A download streams the file; an upload streams into a
//! temporary file beside the target (`.<id>.<pid>.<n>.tmp`, created exclusively, mode 0640 as
//! upstream's), fsynced, renamed over the target and the directory fsynced: a reader sees
//! the old blob or the whole new one, never part of one, and a failed or cut upload leaves
//! nothing behind. Ids are checked by [`super::route`] before anything here runs.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

/// Mode of a stored blob (upstream's `BlobManager.Write`).
pub const BLOB_MODE: u32 = 0o640;

/// How much of a blob one response frame carries.
const CHUNK: usize = 64 * 1024;

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The body is larger than the limit.
    #[error("blob {id} is larger than {limit} bytes")]
    TooLarge { id: String, limit: u64 },
    /// The client sent nothing for too long.
    #[error("blob {id}: no data from the client for {idle:?}")]
    Idle { id: String, idle: Duration },
    /// The body broke off (connection closed, length mismatch).
    #[error("blob {id}: reading the upload: {source}")]
    Body {
        id: String,
        #[source]
        source: hyper::Error,
    },
    /// Writing the file failed (a full disk, …).
    #[error("blob {id}: writing {path}: {source}")]
    Write {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A blob opened for download.
pub struct BlobFile {
    file: tokio::fs::File,
    left: u64,
    buf: Box<[u8]>,
}

impl BlobFile {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.left
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

/// Opens `<dir>/<id>` for download: `Ok(None)` when there is no such blob (also when the name
/// is a directory or a symbolic link: the API serves regular files only).
pub async fn open(dir: &Path, id: &str) -> io::Result<Option<BlobFile>> {
    let path = dir.join(id);
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .await;
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symbolic link.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata().await?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some(BlobFile {
        file,
        left: meta.len(),
        buf: vec![0u8; CHUNK].into_boxed_slice(),
    }))
}

impl Body for BlobFile {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.left).map_or(CHUNK, |l| l.min(CHUNK));
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the blob became shorter while it was sent",
                ))))
            }
            Poll::Ready(Ok(())) => {
                let chunk = Bytes::copy_from_slice(rb.filled());
                this.left -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Removes the temporary file unless the upload was committed.
struct Partial {
    path: PathBuf,
    committed: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Stores the upload `body` as `<dir>/<id>` (see the module documentation), refusing more
/// than `limit` bytes and a client silent for `idle`. Returns the blob's size. On any error
/// the previous blob (if any) is untouched and no temporary file is left.
pub async fn put(
    dir: &Path,
    id: &str,
    mut body: Incoming,
    limit: u64,
    idle: Duration,
) -> Result<u64, PutError> {
    let target = dir.join(id);
    let tmp = dir.join(format!(
        ".{id}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PutError::Write {
            id: id.to_string(),
            path,
            source,
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(BLOB_MODE)
        .open(&tmp)
        .await
        .map_err(write_err(&tmp))?;
    let mut partial = Partial {
        path: tmp.clone(),
        committed: false,
    };
    let mut size: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(PutError::Idle {
                    id: id.to_string(),
                    idle,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(source))) => {
                return Err(PutError::Body {
                    id: id.to_string(),
                    source,
                });
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        size += data.len() as u64;
        if size > limit {
            return Err(PutError::TooLarge {
                id: id.to_string(),
                limit,
            });
        }
        file.write_all(&data).await.map_err(write_err(&tmp))?;
    }
    file.flush().await.map_err(write_err(&tmp))?;
    file.sync_all().await.map_err(write_err(&tmp))?;
    drop(file);
    tokio::fs::rename(&tmp, &target)
        .await
        .map_err(write_err(&target))?;
    partial.committed = true;
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&d).and_then(|f| f.sync_all()))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(write_err(dir))?;
    Ok(size)
}
