//! The long-term sync key K, read from `sync.key_file`: the one secret every LB node
//! shares, from which each session derives its own key (see [`super::wire`]).
//!
//! Whoever holds K can write flows on every node and so steer traffic, so the file is
//! treated as ssh treats a private key: refused if its mode gives group or others
//! any permission. The key is the file's bytes exactly, with nothing trimmed, so
//! `head -c 32 /dev/urandom > key` works even when the last random byte happens to be
//! a newline; a text key (`openssl rand -hex 32 > key`) works too, as long as every
//! node gets a copy of the same file.

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ring::hmac;

/// The shortest key accepted: the output size of SHA-256, so that the key is not the
/// weak point of HMAC-SHA256.
pub const KEY_MIN_LEN: usize = 32;
/// The longest key file accepted. A longer file is not a key someone generated (HMAC
/// would hash it down to 32 bytes anyway); refusing it keeps a wrong path, say a log
/// file, from becoming the key.
pub const KEY_MAX_LEN: usize = 4096;
/// Mode bits that give group or others any access.
const GROUP_OTHER_BITS: u32 = 0o077;

/// The long-term key K, ready for HMAC-SHA256. Its bytes never appear in output.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl Key {
    /// K from raw bytes. Only [`read_key`] makes keys outside tests, so that every
    /// key in use passed the file checks.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Key {
        debug_assert!(
            bytes.len() >= KEY_MIN_LEN,
            "a sync key of {} bytes",
            bytes.len()
        );
        Key(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The key for `ring::hmac`.
    pub(crate) fn hmac(&self) -> &hmac::Key {
        &self.0
    }
}

/// Keys stay out of logs.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a key file was refused. Each names the file and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read sync key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sync key file {path} is not a regular file")]
    NotFile { path: PathBuf },
    #[error(
        "sync key file {path} has mode {mode:04o}, which lets group or others at the key; \
         chmod 600 (or 400) it"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(
        "sync key file {path} holds {len} bytes; a sync key needs at least {KEY_MIN_LEN} \
         random bytes (head -c 32 /dev/urandom > {path})"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("sync key file {path} holds more than {KEY_MAX_LEN} bytes; is it the right file?")]
    TooLong { path: PathBuf },
}

/// Reads K from `path`, refusing a file that is not a regular file, that group or
/// others may access, or whose size is outside 32 to 4096 bytes. The checks look at
/// the opened file, not the path, so a file swapped in between cannot slip through;
/// a symbolic link is followed (Kubernetes mounts Secrets that way: set its
/// `defaultMode` to 0400).
pub fn read_key(path: &Path) -> Result<Key, KeyError> {
    let read_error = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: a FIFO at the path must not hang the daemon in open().
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(KeyError::NotFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = read_at_most(file, KEY_MAX_LEN + 1).map_err(read_error)?;
    if bytes.len() > KEY_MAX_LEN {
        return Err(KeyError::TooLong {
            path: path.to_owned(),
        });
    }
    if bytes.len() < KEY_MIN_LEN {
        return Err(KeyError::TooShort {
            path: path.to_owned(),
            len: bytes.len(),
        });
    }
    Ok(Key::from_bytes(&bytes))
}

/// Up to `limit` bytes of `file`: a file that grows while it is read cannot make the
/// daemon read without end.
fn read_at_most(file: File, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(KEY_MIN_LEN);
    file.take(u64::try_from(limit).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A file in the temp dir with `bytes` and `mode`, removed on drop.
    struct KeyFile(PathBuf);

    impl KeyFile {
        fn new(name: &str, bytes: &[u8], mode: u32) -> KeyFile {
            let path =
                std::env::temp_dir().join(format!("apilb-sync-key-{name}-{}", std::process::id()));
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            KeyFile(path)
        }
    }

    impl Drop for KeyFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    fn message(err: &KeyError) -> String {
        err.to_string()
    }

    /// The tag K gives `data`, to tell two keys apart without seeing their bytes.
    fn tag(key: &Key, data: &[u8]) -> Vec<u8> {
        hmac::sign(key.hmac(), data).as_ref().to_vec()
    }

    #[test]
    fn a_32_byte_random_key_ending_in_a_newline_is_taken_byte_for_byte() {
        let mut bytes = [0x5a_u8; 32];
        bytes[31] = b'\n';
        let file = KeyFile::new("newline", &bytes, 0o600);
        // Trimmed, it would be 31 bytes and refused.
        let key = read_key(&file.0).unwrap();
        assert_eq!(tag(&key, b"x"), tag(&Key::from_bytes(&bytes), b"x"));
        bytes[31] = b'x';
        assert_ne!(tag(&key, b"x"), tag(&Key::from_bytes(&bytes), b"x"));
    }

    #[test]
    fn modes_600_and_400_are_accepted() {
        for mode in [0o600, 0o400] {
            let file = KeyFile::new(&format!("mode{mode:o}"), &[7; 32], mode);
            read_key(&file.0).unwrap_or_else(|e| panic!("mode {mode:o}: {e}"));
        }
    }

    #[test]
    fn any_group_or_other_permission_is_refused_naming_the_path_and_mode() {
        for mode in [0o640, 0o604, 0o644, 0o610, 0o601, 0o660] {
            let file = KeyFile::new(&format!("loose{mode:o}"), &[7; 32], mode);
            let err = read_key(&file.0).unwrap_err();
            assert!(
                matches!(err, KeyError::Mode { mode: m, .. } if m == mode),
                "mode {mode:o}: {err:?}"
            );
            let msg = message(&err);
            assert!(msg.contains(&file.0.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
    }

    #[test]
    fn fewer_than_32_bytes_and_more_than_4096_are_refused() {
        let short = KeyFile::new("short", &[7; 31], 0o600);
        let err = read_key(&short.0).unwrap_err();
        assert!(matches!(err, KeyError::TooShort { len: 31, .. }), "{err:?}");
        assert!(message(&err).contains("head -c 32 /dev/urandom"), "{err}");

        let long = KeyFile::new("long", &[7; KEY_MAX_LEN + 1], 0o600);
        let err = read_key(&long.0).unwrap_err();
        assert!(matches!(err, KeyError::TooLong { .. }), "{err:?}");

        let max = KeyFile::new("max", &[7; KEY_MAX_LEN], 0o600);
        read_key(&max.0).unwrap();
    }

    #[test]
    fn a_missing_file_and_a_directory_are_refused_naming_the_path() {
        let missing = std::env::temp_dir().join("apilb-sync-key-does-not-exist");
        let err = read_key(&missing).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        assert!(
            message(&err).contains("apilb-sync-key-does-not-exist"),
            "{err}"
        );

        let err = read_key(Path::new("/")).unwrap_err();
        assert!(matches!(err, KeyError::NotFile { .. }), "{err:?}");
    }

    #[test]
    fn the_key_is_redacted_in_debug_output() {
        let shown = format!("{:?}", Key::from_bytes(&[0x41; 32]));
        assert_eq!(shown, "Key(<redacted>)");
    }
}
