//! File helpers for the CA directory and issued credentials: private files
//! are created with mode 0600, replaced files are written atomically.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls::crypto::aws_lc_rs;

use crate::CaError;

/// Fill `buf` from the operating system's secure random source.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CaError> {
    aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| CaError::Internal("the system random number generator failed".to_string()))
}

/// Create `path`, failing if it exists. `private` files get mode 0600.
pub(crate) fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), CaError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if private {
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            CaError::AlreadyExists(path.parent().unwrap_or(path).to_path_buf())
        }
        _ => CaError::io("create", path, e),
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| CaError::io("write", path, e))
}

/// Write `path` atomically (temporary file, then rename), replacing any old
/// file. `private` files get mode 0600.
pub(crate) fn write_replace(path: &Path, contents: &[u8], private: bool) -> Result<(), CaError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CaError::Internal(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A stale temporary file from a crash would make create_new fail.
    let _ = std::fs::remove_file(&tmp);
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CaError::io("create", &tmp, e))?;
    let result = file
        .write_all(contents)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(CaError::io("write", path, e));
    }
    Ok(())
}

/// Read a text file of the CA directory; a missing file means "no CA here".
pub(crate) fn read_ca_file(dir: &Path, name: &'static str) -> Result<String, CaError> {
    std::fs::read_to_string(dir.join(name)).map_err(|e| missing_or_io(dir, name, e))
}

pub(crate) fn missing_or_io(dir: &Path, name: &'static str, e: std::io::Error) -> CaError {
    if e.kind() == std::io::ErrorKind::NotFound {
        CaError::NotACa {
            dir: dir.to_path_buf(),
            file: name,
        }
    } else {
        CaError::io("read", &dir.join(name), e)
    }
}

/// Refuse a secret file that group or others may read: a CA key readable
/// by other users is a compromised CA.
///
/// One exception, as PostgreSQL makes for its key: a file owned by root
/// that we (not root) read through our own group, with group read only
/// (mode 0440 or 0640 at most). That is how Kubernetes presents a Secret
/// to a non-root container (`fsGroup` = the container's group), and the
/// group then holds only this container's processes.
pub(crate) fn check_private(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| CaError::io("inspect", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let via_our_group = meta.uid() == 0 && euid != 0 && meta.gid() == egid && mode & 0o037 == 0;
    if mode & 0o077 != 0 && !via_our_group {
        return Err(CaError::InsecureFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// What tells us a file changed without reading it: modification time,
/// length and inode (an atomic replace changes the inode even within one
/// mtime tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

/// The stamp of `path`, or `None` when it does not exist.
pub(crate) fn stamp(path: &Path) -> Result<Option<FileStamp>, CaError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::io("inspect", path, e)),
    }
}
