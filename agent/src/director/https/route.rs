//! What a request of the HTTPS agent API asks for, from its method and path: `POST /agent`,
//! or `GET`/`PUT` of a blob of the agent's local blobstore. The CLI addresses blobs as the DAV
//! client does, `/blobs/<two hex digits>/<id>`; `/blobs/<id>` is accepted too (upstream takes
//! the last path element). Blob ids are checked here, before any file is touched. Pure.

use hyper::Method;

/// The longest blob id accepted (a file name's limit).
pub const MAX_BLOB_ID_LEN: usize = 255;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `POST /agent`: a director request.
    Agent,
    /// `GET /blobs/…/<id>`.
    GetBlob(&'a str),
    /// `PUT /blobs/…/<id>`.
    PutBlob(&'a str),
    /// A blob path whose id (or prefix) is refused.
    BadBlob(BlobPathError),
    /// Anything else (upstream answers 404, also for a wrong method on a known path).
    NotFound,
}

/// Why a blob path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobPathError {
    #[error("blob id is empty")]
    Empty,
    #[error("blob id is {len} bytes long (at most {MAX_BLOB_ID_LEN})")]
    TooLong { len: usize },
    #[error("blob id {id:?} contains {found:?} (allowed: letters, digits, '-', '_', '.')")]
    BadCharacter { id: String, found: char },
    #[error("blob id {0:?} starts with '.'")]
    Hidden(String),
    #[error("blob path prefix {0:?} is not two hex digits")]
    BadPrefix(String),
    #[error("blob path has more than a prefix and an id")]
    TooDeep,
}

/// The route of `method` on `path` (the path only: no query).
pub fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    if path == "/agent" {
        return if method == Method::POST {
            Route::Agent
        } else {
            Route::NotFound
        };
    }
    let Some(rest) = path.strip_prefix("/blobs/") else {
        return Route::NotFound;
    };
    if method != Method::GET && method != Method::PUT {
        return Route::NotFound;
    }
    let id = match blob_id(rest) {
        Ok(id) => id,
        Err(e) => return Route::BadBlob(e),
    };
    if method == Method::GET {
        Route::GetBlob(id)
    } else {
        Route::PutBlob(id)
    }
}

/// The id of `<id>` or `<prefix>/<id>`, checked.
fn blob_id(rest: &str) -> Result<&str, BlobPathError> {
    let mut parts = rest.split('/');
    let (first, second, more) = (parts.next(), parts.next(), parts.next());
    let id = match (first, second, more) {
        (Some(id), None, None) => id,
        (Some(prefix), Some(id), None) => {
            let hex = prefix.len() == 2 && prefix.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                return Err(BlobPathError::BadPrefix(shorten(prefix)));
            }
            id
        }
        _ => return Err(BlobPathError::TooDeep),
    };
    validate_blob_id(id)?;
    Ok(id)
}

/// Checks a blob id: 1 to 255 bytes of letters, digits, `-`, `_` and `.`, not starting with
/// `.` — so it names one file of the blob directory and never `..`, a hidden file or a
/// temporary file of an upload in progress. The ids the CLI and directors make are UUIDs.
pub fn validate_blob_id(id: &str) -> Result<(), BlobPathError> {
    if id.is_empty() {
        return Err(BlobPathError::Empty);
    }
    if id.len() > MAX_BLOB_ID_LEN {
        return Err(BlobPathError::TooLong { len: id.len() });
    }
    if let Some(found) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(BlobPathError::BadCharacter {
            id: shorten(id),
            found,
        });
    }
    if id.starts_with('.') {
        return Err(BlobPathError::Hidden(id.to_string()));
    }
    Ok(())
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ID: &str = "4e4c9c0b-7b3a-4b4e-9a35-3f8e8a1c2d10";

    #[test]
    fn the_clis_paths_route_to_the_agent_and_its_blobs() {
        assert_eq!(route(&Method::POST, "/agent"), Route::Agent);
        let prefixed = format!("/blobs/3f/{ID}");
        assert_eq!(route(&Method::PUT, &prefixed), Route::PutBlob(ID));
        assert_eq!(route(&Method::GET, &prefixed), Route::GetBlob(ID));
        let bare = format!("/blobs/{ID}");
        assert_eq!(route(&Method::GET, &bare), Route::GetBlob(ID));
        assert_eq!(
            route(&Method::PUT, "/blobs/AB/x_y.z-1"),
            Route::PutBlob("x_y.z-1")
        );
    }

    #[test]
    fn other_methods_and_paths_are_not_found_as_upstream() {
        for (m, p) in [
            (Method::GET, "/agent"),
            (Method::PUT, "/agent"),
            (Method::POST, "/agent/"),
            (Method::POST, "/"),
            (Method::GET, "/blobs"),
            (Method::DELETE, "/blobs/ab/x"),
            (Method::HEAD, "/blobs/ab/x"),
            (Method::POST, "/blobs/ab/x"),
            (Method::GET, "/other/ab/x"),
            (Method::GET, "//blobs/x"),
        ] {
            assert_eq!(route(&m, p), Route::NotFound, "{m} {p}");
        }
    }

    #[test]
    fn blob_paths_that_could_leave_the_directory_are_refused() {
        let bad = |p: &str| match route(&Method::GET, p) {
            Route::BadBlob(e) => e,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(bad("/blobs/"), BlobPathError::Empty);
        assert_eq!(bad("/blobs/ab/"), BlobPathError::Empty);
        assert_eq!(bad("/blobs/ab/.."), BlobPathError::Hidden("..".into()));
        assert_eq!(bad("/blobs/.."), BlobPathError::Hidden("..".into()));
        assert_eq!(bad("/blobs/."), BlobPathError::Hidden(".".into()));
        assert_eq!(
            bad("/blobs/ab/.x.123.tmp"),
            BlobPathError::Hidden(".x.123.tmp".into())
        );
        assert_eq!(bad("/blobs/../etc/passwd"), BlobPathError::TooDeep);
        assert_eq!(bad("/blobs/ab/cd/x"), BlobPathError::TooDeep);
        assert_eq!(bad("/blobs/../x"), BlobPathError::BadPrefix("..".into()));
        assert_eq!(bad("/blobs/zz/x"), BlobPathError::BadPrefix("zz".into()));
        assert_eq!(bad("/blobs/abc/x"), BlobPathError::BadPrefix("abc".into()));
        assert!(matches!(
            bad("/blobs/ab/x%2F..%2Fy"),
            BlobPathError::BadCharacter { found: '%', .. }
        ));
        assert!(matches!(
            bad("/blobs/ab/a\\b"),
            BlobPathError::BadCharacter { found: '\\', .. }
        ));
        assert!(matches!(
            bad("/blobs/ab/a b"),
            BlobPathError::BadCharacter { found: ' ', .. }
        ));
        assert!(matches!(
            bad("/blobs/ab/é"),
            BlobPathError::BadCharacter { found: 'é', .. }
        ));
        let long = format!("/blobs/ab/{}", "a".repeat(MAX_BLOB_ID_LEN + 1));
        assert_eq!(
            bad(&long),
            BlobPathError::TooLong {
                len: MAX_BLOB_ID_LEN + 1
            }
        );
        let longest = "a".repeat(MAX_BLOB_ID_LEN);
        assert_eq!(validate_blob_id(&longest), Ok(()));
        // Errors quote at most 64 characters of what they refuse.
        let e = validate_blob_id(&format!("{}%", "b".repeat(200))).unwrap_err();
        assert!(e.to_string().len() < 160, "{e}");
    }
}
